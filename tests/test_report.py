"""`ugcsr report` of a training run folder (in Chromium), and of an upscale DST in the run-partitioned layout."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from typer.testing import CliRunner

from browser import Browser, keep_screenshot, visible_images
from pipelines.cli import app
from pipelines.report import build_report
from pipelines.runfiles import read_run_manifest, read_run_summary
from runs import fake_upscale_run, smooth_image, write_pairs


def test_training_run_report_in_chromium(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    steps = np.arange(0, 400, 4)
    loss = 0.2 + 0.3 * np.exp(-steps / 120) + 0.02 * np.random.default_rng(0).standard_normal(len(steps))
    pq.write_table(pa.table({"step": steps, "loss": loss, "lr": np.full(len(steps), 5e-5)}), run / "metrics.parquet")
    (run / "config.json").write_text(json.dumps({"preset": "tiny", "lr": 5e-5, "batch": 2}))
    for ckpt in (100, 200, 300):
        folder = run / f"checkpoint-{ckpt}" / "validation"
        folder.mkdir(parents=True)
        for k in range(2):
            smooth_image(64, 48).save(folder / f"val{k}.png")
    (run / "checkpoint-200" / "validation" / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "training.html"
    info = build_report(str(run), out, per_page=2)
    assert info["kind"] == "training run" and info["plots"] == ["loss"] and info["gallery_items"] == 6
    browser = Browser()
    try:
        page, messages = browser.open(out)
        keep_screenshot(page, "report-training.png")
        assert messages == [], messages
        images = visible_images(page)
        assert images and all(i["naturalWidth"] > 0 for i in images), images
        assert page.locator("img#plot-loss").evaluate("i => i.naturalWidth") > 0
        assert page.locator("#gallery-validation .card").count() == 3  # one card per checkpoint, 2 per page
        assert page.locator("#gallery-validation .page:not([hidden]) .card").count() == 2
        text = page.locator("#validation").inner_text()
        assert "checkpoint-100" in text and "bad.png: cannot show" in text
        assert "preset" in page.locator("#settings").inner_text()
    finally:
        browser.close()


def test_run_partitioned_manifest_and_summary_elsewhere(tmp_path):
    """The manifest as run=<id>/ parts and summary.json under _runs/<id>/ read as the flat layout is."""
    folders = write_pairs(tmp_path)
    dst = tmp_path / "out"
    fake_upscale_run(folders["lr"], dst)
    flat = read_run_manifest(str(dst))
    for part in sorted((dst / "_manifest").glob("part-*.parquet")):
        run_id = part.name.split("-")[1]
        (dst / "_manifest" / f"run={run_id}").mkdir(exist_ok=True)
        part.rename(dst / "_manifest" / f"run={run_id}" / part.name)
    (dst / "_runs" / "abc").mkdir(parents=True)
    shutil.move(dst / "_manifest" / "summary.json", dst / "_runs" / "abc" / "summary.json")
    nested = read_run_manifest(str(dst))
    def rows(table):
        return sorted(tuple(r.values()) for r in table.select(["image_id", "status", "run"]).to_pylist())

    assert rows(nested) == rows(flat)
    assert len(set(nested["run"].to_pylist())) == 2
    assert read_run_summary(str(dst))["preset"] == "tiny"
    result = CliRunner().invoke(app, ["report", str(dst), "--out", str(tmp_path / "r.html"), "--gallery", "2"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "upscale run" and info["gallery_items"] == 2
    assert "tiny" in (tmp_path / "r.html").read_text()


def test_report_of_something_else_says_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an upscale manifest"):
        build_report(str(tmp_path), tmp_path / "r.html")
