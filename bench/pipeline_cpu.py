"""Ray pipeline overhead on CPU at realistic sizes: the bare batched loop vs the full Ray Data pipeline, one run.

    python bench/pipeline_cpu.py [--images 12] [--steps 1] [--sizes 128 720] [--scenarios x4-mixed-jpeg ...]

Scenarios (inputs of mixed sizes between --sizes, random aspect ratios):
x4 and x1, each written as PNG, WebP or JPEG. For each: (a) the stage classes
called in a plain loop, batches of --batch rows in listing order (no Ray);
(b) `run_upscale` on a local Ray started before the clock; ratios (b)/(a)
with actor start-up included, and excluded (from the first image written on).
Also measured side by side: the mean SR denoising batch in listing order vs
rows sorted by working size inside each read task (what the pipeline does),
with the bare loop timed both ways; and the encode cost per format on the
scenario's SR outputs. Tiny preset, random weights: this measures the
pipeline, not the model.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from actors.decode import DecodeStage, sort_by_working_size
from actors.read import ReadStage
from actors.semantic import SemanticStage
from actors.sr import SRStage
from actors.write import WriteStage, encode_image
from cluster import ray_runtime
from pipelines.upscale.job import UpscaleJob
from pipelines.upscale.listing import list_inputs
from pipelines.upscale.run import run_upscale
from srmodel import get_preset
from srmodel.imaging.sizes import plan_size

SCENARIOS = {f"x{s}-mixed-{f}": (s, f) for s in (4, 1) for f in ("png", "webp", "jpeg")}


def make_src(folder: Path, n: int, lo: int, hi: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        short = int(rng.integers(lo, hi + 1))
        long = int(short * rng.choice([1.0, 4 / 3, 16 / 9]))
        w, h = (long, short) if k % 2 else (short, long)
        small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(folder / f"{k:04d}.png")


def mean_denoise_batch(sizes: list[tuple[int, int]], sr_batch: int, max_batch: int) -> float:
    """Images per denoising call when the SR stage gets `sizes` in this order, `sr_batch` rows per call."""
    calls = 0
    for start in range(0, len(sizes), sr_batch):
        groups = defaultdict(int)
        for s in sizes[start : start + sr_batch]:
            groups[s] += 1
        calls += sum(-(-g // max_batch) for g in groups.values())
    return len(sizes) / calls


def bare_loop(job: UpscaleJob, batch: int, io_batch: int, sort: bool) -> tuple[float, list, float]:
    stages = [SemanticStage(job.model), SRStage(job.model), WriteStage(job.dst, job.format, job.quality)]
    read, decode = ReadStage(), DecodeStage()
    rows = list_inputs(job.src, job.dst, job.storage, job.format).to_pylist()
    s = job.model.sampler
    group = {"scale": s.upscale, "process_size": s.process_size, "multiple": job.model.tiling.pad_multiple}
    forward_batches: list[int] = []  # measured: the batch of every UNet forward (latent tiles, CFG halves included)
    stages[1].upscaler.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: forward_batches.append(int((args[0] if args else kwargs["sample"]).shape[0])),
        with_kwargs=True)
    t = time.perf_counter()
    decoded = []
    for start in range(0, len(rows), io_batch):  # read tasks: io_batch rows, sorted by working size if asked
        chunk = rows[start : start + io_batch]
        b = decode(read({k: [r[k] for r in chunk] for k in chunk[0]}))
        b = sort_by_working_size(b, **group) if sort else b
        decoded += [{k: b[k][i] for k in b} for i in range(len(chunk))]
    srs = []
    for start in range(0, len(decoded), batch):
        chunk = decoded[start : start + batch]
        b = {k: [r[k] for r in chunk] for k in chunk[0]}
        b = stages[0](b)
        b = stages[1](b)
        srs += [np.asarray(x) for x in b["sr_image"]]
        stages[2](b)
    return len(rows) / (time.perf_counter() - t), srs, sum(forward_batches) / max(1, len(forward_batches))


def scenario(name: str, args, work: Path) -> None:
    scale, fmt = SCENARIOS[name]
    src = work / f"src-{name}"
    make_src(src, args.images, args.sizes[0], args.sizes[1], seed=scale)
    model = get_preset("tiny").model_dump(mode="json")
    model["sampler"].update(steps=args.steps, upscale=scale, process_size=64 if scale == 4 else 32)
    res = {"sr_batch": args.batch, "semantic_batch": args.batch, "io_batch": args.io_batch}

    def job(dst: str) -> UpscaleJob:
        return UpscaleJob.model_validate({"src": str(src), "dst": dst, "model": model, "resources": res,
                                          "format": fmt, "manifest_rows_per_file": args.batch})

    j = job(str(work / f"loop-{name}"))
    sizes = [Image.open(p).size for p in sorted(src.iterdir())]
    tiling = j.model.tiling
    padded = [plan_size(w, h, scale, j.model.sampler.process_size, multiple=tiling.pad_multiple).padded_size
              for w, h in sizes]
    by_window = []
    for start in range(0, len(padded), args.io_batch):
        by_window += sorted(padded[start : start + args.io_batch], key=lambda p: (p[0], p[1]))
    fill_plain = mean_denoise_batch(padded, args.batch, tiling.rows)
    fill_sorted = mean_denoise_batch(by_window, args.batch, tiling.rows)

    loop_plain, srs, unet_plain = bare_loop(j, args.batch, args.io_batch, sort=False)
    loop_sorted, _, unet_sorted = bare_loop(job(str(work / f"loop2-{name}")), args.batch, args.io_batch, sort=True)
    enc = {}
    for f in ("png", "webp", "jpeg"):
        t = time.perf_counter()
        for img in srs:
            encode_image(img, f, 95)
        enc[f] = 1000 * (time.perf_counter() - t) / len(srs)

    ray_runtime.connect()
    t = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    summary = run_upscale(job(str(work / f"ray-{name}")),
                          on_progress=lambda done, errors, total: arrivals.append((time.perf_counter(), done)))
    ray_rate = args.images / (time.perf_counter() - t)
    assert summary["by_status"] == {"ok": args.images}, summary["by_status"]
    first_t, first_n = arrivals[0]
    steady = (args.images - first_n) / (arrivals[-1][0] - first_t) if len(arrivals) > 1 else float("nan")
    out_px = [(w * scale, h * scale) for w, h in sizes]
    print(f"{name}: {args.images} images {args.sizes[0]}-{args.sizes[1]} px (outputs up to "
          f"{max(w for w, _ in out_px)}x{max(h for _, h in out_px)}), {args.steps} step(s), batch {args.batch}")
    print(f"  (a) bare batched loop      : {loop_plain:7.3f} images/s (listing order)")
    print(f"  (b) Ray Data pipeline      : {ray_rate:7.3f} images/s, start-up included; ratio (b)/(a) "
          f"{ray_rate / loop_plain:5.2f}")
    print(f"      start-up excluded      : {steady:7.3f} images/s after the first result at {first_t - t:.1f} s; "
          f"ratio {steady / loop_plain:5.2f}")
    print(f"  denoising batch (mean)     : {fill_plain:5.2f} in listing order, {fill_sorted:5.2f} sorted per read "
          f"task ({fill_sorted / fill_plain:4.2f}x); bare loop {loop_plain:.3f} vs {loop_sorted:.3f} images/s "
          f"({loop_sorted / loop_plain:4.2f}x)")
    print(f"  UNet forward batch (mean)  : {unet_plain:5.2f} in listing order, {unet_sorted:5.2f} sorted "
          f"({unet_sorted / unet_plain:4.2f}x; measured by a hook on the UNet: latent tiles x CFG)")
    print(f"  encode ms/image            : png {enc['png']:.0f}, webp {enc['webp']:.0f}, jpeg {enc['jpeg']:.0f} "
          f"(png/jpeg {enc['png'] / enc['jpeg']:.1f}x)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--sizes", type=int, nargs=2, default=[128, 720])
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--io-batch", type=int, default=12)
    ap.add_argument("--scenarios", nargs="+", default=["x4-mixed-jpeg", "x1-mixed-png"], choices=list(SCENARIOS))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ugcsr-bench-"))
    try:
        for name in args.scenarios:
            scenario(name, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
