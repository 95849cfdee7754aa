"""`ugcsr report` against a hostile or careless setting: what it deletes (A) and what it reads (B).

A: `--out X.html` used to rmtree `X_files/` whatever it was (an unrelated folder, the run's DST itself).
B: manifest rows are data; the gallery used to read whatever URI a row named (a loopback URL, a local
file outside the run). Imports of the fix's names are inside the tests, so the file also runs (and fails
on its assertions) against the code before the fix.
"""

import datetime as dt
import http.server
import io
import threading
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.report import build_report
from tests.support.runs import fake_upscale_run, smooth_image, write_pairs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small upscale DST (no model), shared: the tests only read it."""
    root = tmp_path_factory.mktemp("run")
    folders = write_pairs(root)
    fake_upscale_run(folders["lr"], root / "out")
    return {"root": root, "src": folders["lr"], "dst": root / "out"}


def _report(dst, out, *args):
    return CliRunner().invoke(app, ["report", str(dst), "--out", str(out), "--gallery", "2", *args])


# ---------------------------------------------------------------- A: what --out may delete

def test_an_unrelated_files_folder_is_refused_and_kept(run, tmp_path):
    keep = tmp_path / "X_files" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("mine")
    result = _report(run["dst"], tmp_path / "X.html")
    assert result.exit_code == 2, result.output  # the option's fault, not the run's
    said = " ".join(result.output.split())
    assert "X_files" in said and "another --out" in said and "remove" in said
    assert keep.read_text() == "mine" and not (tmp_path / "X.html").exists()


def test_a_dst_named_like_the_files_folder_survives(tmp_path):
    folders = write_pairs(tmp_path)
    dst = tmp_path / "X_files"  # the run's DST: `--out X.html` used to delete it, outputs and manifest
    outputs = fake_upscale_run(folders["lr"], dst)
    result = _report(dst, tmp_path / "X.html")
    assert result.exit_code == 2, result.output
    assert (dst / "_manifest").is_dir() and all(p.is_file() for p in outputs.values())


def test_out_overlapping_the_run_is_refused_even_with_a_marker(run, tmp_path):
    from pipelines.report.render import ASSETS_MARKER, ReportOutError

    with pytest.raises(ReportOutError, match="DST"):  # the page's folder inside DST
        build_report(str(run["dst"]), run["dst"] / "report.html")
    assert not (run["dst"] / "report_files").exists()
    holder = tmp_path / "r_files"  # a marked folder that holds the DST: still never replaced
    (holder / "dst").mkdir(parents=True)
    (holder / ASSETS_MARKER).write_text("")
    (holder / "dst" / "_manifest").symlink_to(run["dst"] / "_manifest", target_is_directory=True)
    with pytest.raises(ReportOutError, match="DST"):
        build_report(str(holder / "dst"), tmp_path / "r.html")
    with pytest.raises(ReportOutError, match="SRC"):  # SRC is known from the run's summary
        build_report(str(run["dst"]), run["src"] / "r.html")
    assert (run["src"] / "a.png").is_file()


def test_a_report_replaces_its_own_folder_and_a_failure_keeps_the_previous(run, tmp_path, monkeypatch):
    from pipelines.report import render

    out = tmp_path / "r.html"
    assert _report(run["dst"], out).exit_code == 0
    assets = tmp_path / "r_files"
    assert (assets / render.ASSETS_MARKER).is_file()
    (assets / "stale.png").write_bytes(b"old")
    assert _report(run["dst"], out).exit_code == 0  # marked: replaced whole
    assert not (assets / "stale.png").exists() and (assets / render.ASSETS_MARKER).is_file()
    page, files = out.read_text(), sorted(p.name for p in assets.rglob("*"))

    def broken(*a, **k):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(render, "_upscale_sections", broken)
    assert _report(run["dst"], out).exit_code == 3
    assert out.read_text() == page and sorted(p.name for p in assets.rglob("*")) == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r_files"]  # no staging folder left


# ---------------------------------------------------------------- B: what the gallery may read

class _Counting(http.server.BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).hits.append(self.path)
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
        self.send_response(200)
        self.send_header("Content-Length", str(len(buf.getvalue())))
        self.end_headers()
        self.wfile.write(buf.getvalue())

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def loopback():
    _Counting.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Counting.hits
    server.shutdown()
    server.server_close()


def _add_rows(dst: Path, rows: list[dict]) -> None:
    """Rows a third run appended (later than the others: they are the images' latest state)."""
    import pyarrow.parquet as pq

    from pipelines.upscale.manifest import run_dir, to_table

    when = dt.datetime(2026, 11, 30, tzinfo=dt.timezone.utc)
    full = [dict(status="ok", params_hash="p" * 16, model_id="tiny:random", node_id="node-9", finished_at=when,
                 **r) for r in rows]
    folder = Path(run_dir(str(dst), "20261130T000000Z-cccccc"))
    folder.mkdir(parents=True)
    pq.write_table(to_table(full), folder / "part-0.parquet")


def test_rows_outside_src_and_dst_are_never_read(loopback, tmp_path):
    url, hits = loopback
    folders = write_pairs(tmp_path)
    dst = tmp_path / "out"
    fake_upscale_run(folders["lr"], dst)
    secret = tmp_path / "elsewhere" / "secret.png"  # a local file outside the run
    secret.parent.mkdir()
    smooth_image(96, 64).save(secret)
    (dst / "escape.png").symlink_to(secret)  # under DST by name, outside by realpath
    _add_rows(dst, [dict(image_id="web", src_uri=f"{url}/in.png", dst_uri=f"{url}/out.png"),
                    dict(image_id="file", src_uri=f"file://{secret}", dst_uri=str(secret)),
                    dict(image_id="link", src_uri=str(folders["lr"] / "a.png"), dst_uri=str(dst / "escape.png")),
                    dict(image_id="dots", src_uri=str(folders["lr"] / "a.png"), dst_uri=f"{dst}/../elsewhere/secret.png")])
    out = tmp_path / "site" / "r.html"
    info = build_report(str(dst), out, gallery=50)
    assert hits == []  # not one request to the loopback server
    page = out.read_text()
    for name in ("out.png", "secret.png", "escape.png"):
        assert f"{name}: cannot show (not under the run&#39;s SRC/DST)" in page, name
    assert info["gallery_items"] == 6 + 4  # every row has its card; the 4 above without pictures
    assert len(list((tmp_path / "site" / "r_files" / "gallery").glob("*_out.jpg"))) == 6  # the run's own only


def test_read_scope_rules():
    from pipelines.report.scope import ReadScope, src_root

    s3 = ReadScope.of("s3://bucket/runs/r1", src_root("s3://lists/day/list.parquet"))
    assert s3.allows("s3://bucket/runs/r1/a.png") and s3.allows("s3a://bucket/runs/r1/x/b.png")
    assert s3.allows("s3://lists/day/img/c.png")  # a list's entries beside it
    for uri in ("s3://bucket/runs/r10/a.png", "s3://other/runs/r1/a.png", "s3://bucket/runs/r1/../r2/a.png",
                "s3://bucket/runs/r1/%2e%2e/r2/a.png", "s3://lists/elsewhere/c.png", "gs://bucket/runs/r1/a.png",
                "http://127.0.0.1/runs/r1/a.png", "/etc/passwd", "", None):
        assert not s3.allows(uri), uri
    local = ReadScope.of("/data/run", src_root("/data/lists/in.txt"))
    assert local.allows("file:///data/run/a.png") and local.allows("/data/lists/x/b.png")
    assert not local.allows("/data/run2/a.png") and not local.allows("file://host/data/run/a.png")
    assert not local.allows("/data/run/../secret.png")


def test_the_scope_comes_from_the_run_summary(run):
    from cluster.storage import StorageConfig
    from pipelines.report.data import load_upscale_run

    loaded = load_upscale_run(str(run["dst"]), StorageConfig(), eval_dir=None, gallery=2, per_page=2)
    assert loaded.src == str(run["src"]) and loaded.scope.roots == (str(run["dst"]), str(run["src"]))


def test_a_training_runs_symlink_out_is_not_shown(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    val = run / "checkpoint-100" / "validation"
    val.mkdir(parents=True)
    pq.write_table(pa.table({"step": np.arange(4), "loss": np.ones(4)}), run / "metrics.parquet")
    smooth_image(32, 24).save(val / "v.png")
    smooth_image(32, 24).save(tmp_path / "secret.png")
    (val / "link.png").symlink_to(tmp_path / "secret.png")  # found under the run, a file from elsewhere
    info = build_report(str(run), tmp_path / "t.html")
    assert info["gallery_items"] == 1 and "link.png: cannot show (not under the run folder)" in (tmp_path / "t.html").read_text()
