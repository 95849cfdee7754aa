"""`ugcsr evaluate` on local Ray (an upscale DST, S3 folders via the CLI) and `ugcsr report` of that run in Chromium."""

import io
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.support.browser import Browser, keep_screenshot, visible_images
from pipelines.cli import app
from pipelines.evaluate import EvalJob, pair, run_evaluate, sr_candidates
from pipelines.report import build_report
from tests.support.runs import fake_upscale_run, smooth_image, write_pairs
from srmodel.metrics.challenge import psnr_y, ssim_y


@pytest.fixture(scope="module")
def ray_eval(tmp_path_factory):
    """A local Ray whose workers see no AlexNet weights (an empty torch hub): LPIPS must come out null with a reason."""
    import os

    import ray

    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch-home"))
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # never a stray cluster
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def evaluated(ray_eval, tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    folders = write_pairs(root)
    dst = root / "out"
    outputs = fake_upscale_run(folders["lr"], dst)
    summary = run_evaluate(EvalJob(sr=str(dst), gt=str(folders["gt"]), resources={"actors": 1}))
    rows = {r["image"]: r for r in pq.read_table(dst / "_eval" / "metrics.parquet").to_pylist()}
    return dict(root=root, dst=dst, gt=folders["gt"], outputs=outputs, summary=summary, rows=rows)


def test_pairing_by_path_then_stem_with_strip():
    gt = {"a.png": "gt/a", "sub/b.png": "gt/b", "c_HR.png": "gt/c", "dup/x.png": "gt/x1", "dup2/x.png": "gt/x2"}
    sr = {"a.webp": "sr/a", "other/b.png": "sr/b", "c_LR4.png": "sr/c", "x.png": "sr/x", "zzz.png": "sr/z"}
    pairs, lonely_gt, lonely_sr = pair(gt, sr, None)
    assert pairs == {"a.png": "sr/a", "sub/b.png": "sr/b"}  # same path; unique stem in another folder
    assert lonely_gt == ["c_HR.png", "dup/x.png", "dup2/x.png"]  # x is ambiguous: never guessed
    assert lonely_sr == ["c_LR4.png", "x.png", "zzz.png"]
    pairs, _, lonely_sr = pair(gt, sr, r"_(HR|LR\d)$")
    assert pairs["c_HR.png"] == "sr/c" and lonely_sr == ["x.png", "zzz.png"]


def test_evaluate_names_a_missing_folder(tmp_path):
    (tmp_path / "sr").mkdir()
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "sr"), str(tmp_path / "nope")])
    assert result.exit_code == 3 and "nope is not a folder/prefix of images" in " ".join(result.output.split())


@pytest.mark.slow  # local Ray
def test_evaluate_an_upscale_run(evaluated):
    rows, summary, gt = evaluated["rows"], evaluated["summary"], evaluated["gt"]
    assert sorted(rows) == ["a.png", "b.png", "broken.png", "d.png", "lonely.png", "odd.png", "sub/c.png"]
    for name in ("a.png", "b.png", "d.png", "sub/c.png"):
        r = rows[name]
        sr = np.asarray(Image.open(evaluated["outputs"][name]).convert("RGB"))
        hr = np.asarray(Image.open(gt / name).convert("RGB"))
        assert r["status"] == "ok" and r["error_type"] is None
        assert r["psnr"] == pytest.approx(psnr_y(sr, hr), abs=1e-9) and r["ssim"] == pytest.approx(ssim_y(sr, hr), abs=1e-12)
        assert r["lpips"] is None and (r["gt_width"], r["gt_height"]) == (96, 64) == (r["sr_width"], r["sr_height"])
    # a failed upscale, a size mismatch, a GT with no input: rows with errors, never a crash
    assert rows["broken.png"]["stage"] == "upscale" and rows["broken.png"]["error_type"] == "DecodeError"
    assert rows["odd.png"]["error_type"] == "SizeMismatch" and "96x64 vs GT 98x66" in rows["odd.png"]["error_message"]
    assert rows["lonely.png"]["error_type"] == "Unpaired" and "--strip" in rows["lonely.png"]["error_message"]
    assert summary["sr_kind"] == "upscale run"
    assert summary["counts"] == {"gt_images": 7, "sr_images": 6, "rows": 7, "ok": 4, "error": 3,
                                 "unpaired_gt": 2, "unpaired_sr": 1}
    assert summary["unpaired_sr"] == ["nogt.png"]
    assert summary["means"]["psnr"] == pytest.approx(np.mean([rows[n]["psnr"] for n in ("a.png", "b.png", "d.png", "sub/c.png")]))
    assert "alexnet-owt-7be5be79.pth" in summary["missing"]["lpips"]
    assert all("pyiqa" in summary["missing"][m] for m in ("musiq", "maniqa", "clipiqa"))
    assert summary["score"] is None and "lpips" in summary["score_note"]
    assert json.loads((evaluated["dst"] / "_eval" / "summary.json").read_text()) == summary


def test_evaluate_folders_on_s3_through_the_cli(ray_eval, s3, s3_endpoint, tmp_path):
    s3.create_bucket(Bucket="bench")
    for k in range(3):
        hr = Image.fromarray((20 + 0.8 * np.asarray(smooth_image(64, 48))).astype(np.uint8))  # 20..224: no clipping below
        sr = (np.asarray(hr).astype(int) + 3 * (k + 1)).astype(np.uint8)
        for key, img in ((f"RealSR/HR/img{k}.png", hr), (f"sr/img{k}.png", Image.fromarray(sr))):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            s3.put_object(Bucket="bench", Key=key, Body=buf.getvalue())
    s3.put_object(Bucket="bench", Key="sr/img2-copy.png", Body=b"not a png")
    result = CliRunner().invoke(app, ["evaluate", "s3://bench/sr", "s3://bench/RealSR/HR", "--out", "s3://bench/eval",
                                      "--endpoint-url", s3_endpoint, "--no-lpips", "--actors", "1"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket="bench", Key="eval/metrics.parquet")["Body"].read()))
    assert table.column_names[:8] == ["image", "image_id", "gt_uri", "sr_uri", "status", "stage", "error_type", "error_message"]
    rows = table.to_pylist()
    assert [r["image"] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    # a uniform shift of 3(k+1) grey levels is a closed-form PSNR
    for k, r in enumerate(rows):
        assert r["status"] == "ok" and r["lpips"] is None
        assert r["psnr"] == pytest.approx(10 * math.log10(255**2 / (3 * (k + 1) * 219 / 255) ** 2), abs=1e-9)
    summary = json.loads(s3.get_object(Bucket="bench", Key="eval/summary.json")["Body"].read())
    assert summary["unpaired_sr"] == ["img2-copy.png"] and summary["missing"]["lpips"] == "disabled (--no-lpips)"
    comp = summary["comparison"]  # GT under a RealSR/ prefix: compared with the published RealSR numbers
    assert comp["dataset"] == "RealSR" and comp["rows"][0]["psnr"] == pytest.approx(summary["means"]["psnr"])
    assert {r["method"] for r in comp["rows"][1:]} == {"SeeSR (50)", "OSEDiff (1)", "Real-ESRGAN"}


def test_an_upscale_dst_copied_to_s3_is_read_there(s3, s3_endpoint, tmp_path):
    """Manifest and listing read from S3; outputs found under SR by their keys, not at the run's old paths."""
    folders = write_pairs(tmp_path)
    fake_upscale_run(folders["lr"], tmp_path / "out")
    s3.create_bucket(Bucket="runs")
    for p in (tmp_path / "out").rglob("*"):
        if p.is_file():
            s3.upload_file(str(p), "runs", f"copy/{p.relative_to(tmp_path / 'out').as_posix()}")
    job = EvalJob(sr="s3://runs/copy", gt=str(folders["gt"]), storage={"endpoint_url": s3_endpoint})
    outputs, failed, kind = sr_candidates(job)
    assert kind == "upscale run" and sorted(failed) == ["broken.png"]
    assert outputs == {k: f"s3://runs/copy/{k}" for k in ("a.png", "b.png", "d.png", "nogt.png", "odd.png", "sub/c.png")}


@pytest.mark.slow  # local Ray and a browser
def test_report_of_the_run_in_chromium(evaluated, tmp_path):
    out = tmp_path / "site" / "report.html"
    info = build_report(str(evaluated["dst"]), out, gallery=4, per_page=2)
    assert info["kind"] == "upscale run" and set(info["plots"]) == {"throughput", "stages", "psnr_hist"}
    text = out.read_text()
    assert "http://" not in text and "https://" not in text, "the page must work offline"
    browser = Browser()
    try:
        page, messages = browser.open(out)
        shot = keep_screenshot(page, "report-upscale.png")
        assert messages == [], messages
        images = visible_images(page)
        assert images and all(i["naturalWidth"] > 0 for i in images), images
        assert {i["src"].split("/")[-1] for i in images if i["cls"] == "plot"} == {"throughput.png", "stages.png",
                                                                                   "psnr_hist.png"}
        # the worst image by PSNR is shown with its ground truth; the sample is paged (4 images, 2 per page)
        assert page.locator("#gallery-worst .card").count() == 1 and page.locator("#gallery-worst img.gt").count() == 1
        assert page.locator("#gallery-sample .page[hidden] img[data-src]").count() > 0
        page.locator("#gallery-sample .pager button[data-goto='1']").click()
        page.wait_for_function("Array.from(document.querySelectorAll('#gallery-sample .page:not([hidden]) img'))"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("#gallery-sample .page[data-page='1']").is_visible()
        # counts and errors as the manifest says: the resumed image counts once, as ok
        counts = page.locator("#counts").inner_text()
        assert "ok\t6\t6" in counts and "error\t1\t2" in counts
        assert "DecodeError" in page.locator("#errors").inner_text()
        assert "SizeMismatch" in page.locator("#metrics").inner_text()  # evaluate's errors, by type
        assert shot.stat().st_size > 10_000
    finally:
        browser.close()
