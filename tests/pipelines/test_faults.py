"""Faults: the driver killed mid-run and resumed; an SR actor process killed mid-run."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.support.inputs import rng_image
from pipelines.upscale.job import UpscaleJob
from pipelines.upscale.manifest import read_manifest
from pipelines.upscale.run import run_upscale
from srmodel import get_preset

pytestmark = pytest.mark.slow  # driver and actor processes killed mid-run

STORAGE = UpscaleJob.model_fields["storage"].default


def model(steps=3):
    m = get_preset("tiny").model_dump(mode="json")
    m["sampler"].update(steps=steps)
    return m


def make_src(folder: Path, n: int) -> Path:
    folder.mkdir()
    for k in range(n):
        rng_image(16 + (k % 3) * 8, 12 + (k % 2) * 8, k).save(folder / f"img{k:02d}.png")
    return folder


def ok_rows(dst) -> list[dict]:
    return [r for r in read_manifest(str(dst), STORAGE).to_pylist() if r["status"] == "ok"]


def pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(uri.removeprefix("file://")), dtype=np.int16)


def test_driver_killed_then_resumed_matches_a_clean_run(ray_local, tmp_path, tiny_cache):
    src = make_src(tmp_path / "src", 12)
    dst, clean = tmp_path / "out", tmp_path / "clean"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({"model": model(), "manifest_rows_per_file": 2,
                                   "resources": {"sr_batch": 2, "io_batch": 2, "semantic_batch": 2}}))
    cmd = [sys.executable, "-m", "pipelines.cli", "upscale", str(src), str(dst), "--config", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "UGCSR_CACHE": tiny_cache})
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and not list((dst / "_manifest").rglob("part-*.parquet")):
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray, as in a crash
        proc.wait()
    partial = ok_rows(dst)
    assert 0 < len(partial) < 12, len(partial)

    job = UpscaleJob.model_validate({"src": str(src), "dst": str(dst), "model": model(),
                                     "resources": {"sr_batch": 2, "io_batch": 2}})
    resumed = run_upscale(job)
    assert resumed["by_status"]["skipped"] == len({r["image_id"] for r in partial})
    run_upscale(job.model_copy(update={"dst": str(clean)}))

    after, reference = ok_rows(dst), ok_rows(clean)
    assert sorted(r["image_id"] for r in after) == sorted(r["image_id"] for r in reference)
    assert len(after) == len({r["image_id"] for r in after}) == 12, "exactly one ok row per image"
    ref_by_id = {r["image_id"]: r for r in reference}
    for row in after:
        a, b = pixels(row["dst_uri"]), pixels(ref_by_id[row["image_id"]]["dst_uri"])
        assert a.shape == b.shape
        # Per-image seeds: the same pixels whatever batch an image landed in (float32 rounding: <= 1 level).
        assert np.abs(a - b).max() <= 1


def _sr_actor_pids():
    import psutil

    # Ray titles an actor's process "ray::<class>", e.g. ray::MapWorker(MapBatches(SRStage)).
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::") and "SRStage" in cmd:
            found.append(p.info["pid"])
    return found


def test_sr_actor_killed_mid_run_loses_and_duplicates_nothing(ray_local, tmp_path):
    src = make_src(tmp_path / "src", 10)
    dst = tmp_path / "out"
    job = UpscaleJob.model_validate({"src": str(src), "dst": str(dst), "model": model(), "manifest_rows_per_file": 2,
                                     "resources": {"sr_batch": 2, "io_batch": 2, "semantic_batch": 2}})
    first_rows = threading.Event()
    result = {}

    def run():
        result["summary"] = run_upscale(job, on_progress=lambda *_: first_rows.set())

    worker = threading.Thread(target=run)
    worker.start()
    assert first_rows.wait(300), "no rows came out"
    pids = _sr_actor_pids()
    assert pids, "no live SR actor found"
    os.kill(pids[0], signal.SIGKILL)
    worker.join(600)
    assert not worker.is_alive()
    summary = result["summary"]
    assert summary["by_status"] == {"ok": 10}
    rows = read_manifest(str(dst), STORAGE).to_pylist()
    assert len(rows) == 10 and len({r["image_id"] for r in rows}) == 10
    assert all(Path(r["dst_uri"].removeprefix("file://")).is_file() for r in rows)
