"""Soak (CI-sized): over a thousand tiny images, resumed in the middle; driver memory flat, each image once."""

import os
import time
import tracemalloc

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from tests.support.inputs import rng_image
from pipelines.upscale.job import UpscaleJob
from pipelines.upscale.run import run_upscale
from srmodel import get_preset

pytestmark = pytest.mark.slow  # thousands of images through local Ray

# Over a thousand in CI; UGCSR_SOAK_IMAGES shortens a local run on a busy machine.
N = int(os.environ.get("UGCSR_SOAK_IMAGES", "1200"))


class Interrupted(Exception):
    pass


class DriverMemory:
    """The driver's Python heap (tracemalloc) plus Arrow's buffers (outside that heap), sampled as batches finish."""

    def __init__(self):
        self.samples: list[tuple[int, int]] = []

    def __call__(self, done, errors, total):
        self.samples.append((done, tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes()))


def test_soak_thousands_of_images_with_resume(ray_local, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    for k in range(N):
        folder = src / f"d{k % 20:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        rng_image(4 + k % 5, 4 + k % 3, k).save(folder / f"{k:05d}.png", compress_level=0)
    (src / "d00" / "broken.png").write_bytes(b"not an image")
    model = get_preset("tiny").model_dump(mode="json")
    model["sampler"].update(steps=1, upscale=1, process_size=16, prompt_source="fixed", fixed_tags="soak")
    job = UpscaleJob.model_validate({
        "src": str(src), "dst": str(dst), "model": model, "format": "jpeg", "manifest_rows_per_file": 200,
        "plan_buckets": 4,  # batches of 64: the per-batch overhead, not the tiny model, dominates here
        "execution_images": N // 3,  # bounded executions: a few Ray Data executions per run, one summary
        "resources": {"sr_batch": 64, "semantic_batch": 64, "io_batch": 64, "io_tasks": 2},
    })
    # Run 1 is interrupted: the driver stops consuming after half the images (as a crash would).
    memory = DriverMemory()

    def first(done, errors, total):
        memory(done, errors, total)
        if done >= N // 2:
            raise Interrupted  # the driver loop stops, as on Ctrl-C

    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(Interrupted):
        run_upscale(job, on_progress=first)
    part1 = time.perf_counter() - t
    second = DriverMemory()
    t = time.perf_counter()
    summary = run_upscale(job, on_progress=second)
    part2 = time.perf_counter() - t
    tracemalloc.stop()

    table = pads.dataset(dst / "_manifest", partitioning="hive").to_table()
    ok = table.filter(pads.field("status") == "ok")
    ids = ok.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == N, "every image has exactly one ok row"
    runs = set(table.column("run").to_pylist())
    assert len(runs) == 2 and summary["run_id"] in runs
    this_run = table.filter(pads.field("run") == summary["run_id"])
    assert this_run.num_rows == summary["processed"] == N + 1 - summary["by_status"]["skipped"]
    assert len(set(this_run.column("image_id").to_pylist())) == this_run.num_rows, "one row per image in a run"
    assert summary["by_status"]["error"] == 1 and summary["unaccounted"] == 0
    assert summary["by_status"]["skipped"] >= N // 2
    assert summary["executions"] >= 2, summary
    # Driver memory flat: what the driver holds after the last parts is what it held after the first ones.
    heap = [m for _, m in second.samples]
    early, late = max(heap[: max(1, len(heap) // 4)]), max(heap[-max(1, len(heap) // 4):])
    print(f"soak: {N} images, run 1 {part1:.0f} s (stopped at {memory.samples[-1][0]}), run 2 {part2:.0f} s; "
          f"driver heap + Arrow early {early / 2**20:.1f} MiB, late {late / 2**20:.1f} MiB, {len(heap)} samples")
    assert late - early < 8 * 2**20, (early, late)
