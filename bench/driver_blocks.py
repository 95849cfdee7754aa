"""Driver memory per Ray Data block: one execution over every image vs bounded executions, one run.

    python bench/driver_blocks.py [--images 600] [--per-execution 100]

Ray Data keeps a stats record per output block per operator on the driver until its execution ends
(`MapOperator._output_blocks_stats`), so a run of 10^8 images as one execution grows the driver by
records x operators x blocks. Here every block holds one image (`io_batch = sr_batch = 1`), the tiny
model at 1 step, so blocks, not pixels, dominate. The driver's Python heap (tracemalloc) plus Arrow's
buffers is sampled after a full garbage collection every 25 written blocks (what the driver keeps, not
garbage not yet collected); printed per run: the growth from the first to the
last sample in bytes per block and the peak above the first sample, for `execution_images` = all
images (one execution) and = --per-execution (bounded), side by side, after a warm-up run.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from cluster import ray_runtime
from pipelines.upscale.job import UpscaleJob
from pipelines.upscale.run import run_upscale
from srmodel import get_preset


def make_inputs(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for k in range(n):
        sub = folder / f"d{k % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(sub / f"{k:06d}.png")


def measure(src: Path, dst: Path, per_execution: int) -> dict:
    model = get_preset("tiny").model_dump(mode="json")
    model["sampler"].update(steps=1, upscale=1, process_size=16, prompt_source="fixed", fixed_tags="bench")
    job = UpscaleJob.model_validate({
        "src": str(src), "dst": str(dst), "model": model, "format": "png", "execution_images": per_execution,
        "plan_buckets": 16, "manifest_rows_per_file": 1,  # a write batch (a progress sample) per block
        "resources": {"sr_batch": 1, "semantic_batch": 1, "io_batch": 1, "io_tasks": 2},
    })
    samples: list[tuple[int, int]] = []

    def sample(done, errors, total):
        # What the driver keeps, not garbage not yet collected: a full collection before every 25th sample.
        if samples and done < total and done // 25 == samples[-1][0] // 25:
            return
        gc.collect()
        samples.append((done, tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes()))

    tracemalloc.start()
    t = time.perf_counter()
    summary = run_upscale(job, on_progress=sample)
    wall = time.perf_counter() - t
    tracemalloc.stop()
    (d0, m0), (d1, m1) = samples[0], samples[-1]
    return {"execution_images": per_execution, "executions": summary["executions"], "images": summary["processed"],
            "wall_s": round(wall, 1), "samples": len(samples),
            "bytes_per_block": round((m1 - m0) / max(1, d1 - d0)),  # first to last sample of the run
            "driver_mb_peak": round((max(m for _, m in samples) - m0) / 2**20, 2)}  # above the first sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--per-execution", type=int, default=100)
    args = ap.parse_args()
    ray_runtime.connect(num_cpus=8)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        make_inputs(src, args.images)
        measure(src, Path(tmp) / "warm-up", args.images)  # imports, caches and Ray's workers: not in the figures
        results = [measure(src, Path(tmp) / f"out{k}", per) for k, per in enumerate((args.images, args.per_execution))]
    for r in results:
        print(json.dumps(r))
    one, bounded = results
    print(f"driver growth per block (first to last sample): one execution {one['bytes_per_block']} B, bounded "
          f"executions of {args.per_execution} images {bounded['bytes_per_block']} B; peak above the start "
          f"{one['driver_mb_peak']} MiB vs {bounded['driver_mb_peak']} MiB; wall {one['wall_s']} s vs "
          f"{bounded['wall_s']} s ({bounded['executions']} executions)")


if __name__ == "__main__":
    main()
