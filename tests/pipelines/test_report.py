"""`ugcsr report` of a training run folder (in Chromium), and of an upscale DST in the run-partitioned layout."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from typer.testing import CliRunner

from tests.support.browser import Browser, keep_screenshot, visible_images
from pipelines.cli import app
from pipelines.report import build_report
from pipelines.upscale.outputs import read_run_manifest, read_run_summary
from tests.support.runs import fake_upscale_run, smooth_image, write_pairs


@pytest.mark.slow  # a browser
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


def test_run_partitioned_manifest_and_the_older_flat_layout_read_alike(tmp_path):
    """The manifest as run=<id>/ parts (as the pipeline writes it) and as flat part-<run>-<n>.parquet files
    (older versions) read as one table; summary.json under _runs/<id>/ is found without _runs/latest/."""
    folders = write_pairs(tmp_path)
    dst = tmp_path / "out"
    fake_upscale_run(folders["lr"], dst)
    nested = read_run_manifest(str(dst))
    for part in sorted((dst / "_manifest").glob("run=*/*.parquet")):
        run_id = part.parent.name.removeprefix("run=").replace("-", "")
        part.rename(dst / "_manifest" / f"part-{run_id}-0.parquet")
        part.parent.rmdir()
    shutil.rmtree(dst / "_runs" / "latest")
    flat = read_run_manifest(str(dst))

    def rows(table):
        return sorted(tuple(r.values()) for r in table.select(["image_id", "status"]).to_pylist())

    assert rows(nested) == rows(flat) and len(rows(flat)) == 8
    assert len(set(nested["run"].to_pylist())) == len(set(flat["run"].to_pylist())) == 2
    assert read_run_summary(str(dst))["preset"] == "tiny"
    result = CliRunner().invoke(app, ["report", str(dst), "--out", str(tmp_path / "r.html"), "--gallery", "2"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "upscale run" and info["gallery_items"] == 2
    assert "tiny" in (tmp_path / "r.html").read_text()


def test_report_of_something_else_says_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an upscale manifest"):
        build_report(str(tmp_path), tmp_path / "r.html")


@pytest.fixture(scope="module")
def ray_e2e(tiny_cache):
    """A new local Ray (address="local": never a cluster someone else started on this machine)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_upscale_then_evaluate_then_report(ray_e2e, tmp_path):
    """The real chain on the tiny model: `upscale` writes the manifest that `evaluate` and `report` read."""
    from pipelines.evaluate import EvalJob, run_evaluate
    from pipelines.upscale.job import UpscaleJob
    from pipelines.upscale.run import run_upscale
    from srmodel import get_preset

    for name in ("x", "y"):
        hr = smooth_image(64, 48)
        (tmp_path / "gt").mkdir(exist_ok=True)
        (tmp_path / "lr").mkdir(exist_ok=True)
        hr.save(tmp_path / "gt" / f"{name}.png")
        hr.resize((16, 12)).save(tmp_path / "lr" / f"{name}.jpg")
    (tmp_path / "lr" / "z.png").write_bytes(b"")  # an empty file: an error row in the manifest
    smooth_image(64, 48).save(tmp_path / "gt" / "z.png")
    model = get_preset("tiny").model_dump(mode="json")
    model["sampler"].update(steps=2, process_size=64, prompt_source="fixed", fixed_tags="a photo")
    dst = tmp_path / "out"
    run_upscale(UpscaleJob.model_validate({"src": str(tmp_path / "lr"), "dst": str(dst), "model": model}))
    summary = run_evaluate(EvalJob(sr=str(dst), gt=str(tmp_path / "gt"), resources={"actors": 1}))
    assert summary["sr_kind"] == "upscale run"
    assert summary["counts"] == {"gt_images": 3, "sr_images": 2, "rows": 3, "ok": 2, "error": 1,
                                      "unpaired_gt": 1, "unpaired_sr": 0}
    assert summary["by_error_type"] == {"DecodeError": 1}  # z's upscale failure, carried into its row
    assert 0 < summary["means"]["psnr"] < 60 and -1 <= summary["means"]["ssim"] <= 1
    info = build_report(str(dst), tmp_path / "report.html", gallery=2)
    assert info["gallery_items"] == 2 + 1  # the sample and the lowest-PSNR card
    text = (tmp_path / "report.html").read_text()
    assert "tiny" in text and "DecodeError" in text and "empty file" in text
