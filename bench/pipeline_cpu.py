"""Ray pipeline overhead on CPU: the bare actor loop vs the full Ray Data pipeline, same images, one run.

    python bench/pipeline_cpu.py [--images 32] [--steps 4]

(a) the stage classes called in a plain loop (no Ray), (b) `run_upscale` on a
local Ray started before the clock starts, (c) (b)/(a). Tiny preset, random
weights: this measures the pipeline, not the model.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from actors.decode import DecodeStage
from actors.read import ReadStage
from actors.semantic import SemanticStage
from actors.sr import SRStage
from actors.write import WriteStage
from cluster import ray_runtime
from pipelines.job import UpscaleJob
from pipelines.listing import list_inputs
from pipelines.upscale import run_upscale
from srmodel import get_preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ugcsr-bench-"))
    src = work / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(args.images):
        Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(src / f"{k:04d}.png")
    model = get_preset("tiny").model_dump(mode="json")
    model["sampler"]["steps"] = args.steps
    res = {"sr_batch": args.batch, "semantic_batch": args.batch, "io_batch": args.batch, "rows_per_block": args.batch}

    def job(dst: str) -> UpscaleJob:
        return UpscaleJob.model_validate({"src": str(src), "dst": dst, "model": model, "resources": res})

    # (a) bare loop: the same stage classes, same batch size, no Ray.
    j = job(str(work / "loop"))
    stages = [ReadStage(), DecodeStage(), SemanticStage(j.model), SRStage(j.model), WriteStage(j.dst)]
    listing, _ = list_inputs(j.src, j.dst, j.storage, j.format)
    rows = listing.to_pylist()
    t = time.perf_counter()
    for start in range(0, len(rows), args.batch):
        chunk = rows[start : start + args.batch]
        batch = {k: [r[k] for r in chunk] for k in chunk[0]}
        for stage in stages:
            batch = stage(batch)
    loop = args.images / (time.perf_counter() - t)

    # (b) Ray Data pipeline; Ray is started before the clock, actor start-up is counted.
    ray_runtime.connect()
    t = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    summary = run_upscale(job(str(work / "ray")), on_rows=lambda r: arrivals.append((time.perf_counter(), len(r))))
    ray_rate = args.images / (time.perf_counter() - t)
    # Steady state: from the first output batch on (actor start-up and pipeline fill excluded).
    steady = sum(n for _, n in arrivals[1:]) / (arrivals[-1][0] - arrivals[0][0]) if len(arrivals) > 1 else float("nan")
    assert summary["by_status"] == {"ok": args.images}, summary["by_status"]

    print(f"tiny preset, {args.images} images of {args.size}px, x4, {args.steps} steps, batch {args.batch}, CPU")
    print(f"  (a) bare actor loop      : {loop:7.3f} images/s")
    print(f"  (b) Ray Data pipeline    : {ray_rate:7.3f} images/s (actor start-up included)")
    print(f"  (c) ratio (b)/(a)        : {ray_rate / loop:7.2f}")
    print(f"  first output after {arrivals[0][0] - t:.1f} s; steady-state pipeline {steady:.3f} images/s, "
          f"ratio to (a) {steady / loop:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
