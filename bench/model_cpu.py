"""Tiny-preset model throughput on CPU: batch 1 vs batch 8, measured side by side in one run.

    python bench/model_cpu.py [--images 8] [--size 32] [--steps 4] [--repeats 2]

Random weights: this measures how well the SR stage batches, not image quality.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from srmodel import SemanticEncoder, SemanticUpscaler, SRRequest, build_prompt, ensure_tiny_model, get_preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=32, help="input side in pixels (x4 output)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    source = ensure_tiny_model()
    cfg = get_preset("tiny", source)
    cfg = cfg.model_validate(
        {**cfg.model_dump(), "sampler": {**cfg.sampler.model_dump(), "steps": args.steps},
         "tiling": {**cfg.tiling.model_dump(), "max_batch": 2 * args.images}}
    )
    up = SemanticUpscaler.from_config(cfg)
    enc = SemanticEncoder.from_pretrained(source.sam2_checkpoint, source.sam2_config)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.images)]
    tokens = enc.encode(images)
    reqs = [SRRequest(im, tokens[i], build_prompt("tag"), i) for i, im in enumerate(images)]

    up.upscale(reqs[:1])  # warm-up
    best = {"batch 1": float("inf"), f"batch {args.images}": float("inf")}
    for _ in range(args.repeats):  # interleaved, so both see the same machine state
        t = time.perf_counter()
        for r in reqs:
            up.upscale([r])
        best["batch 1"] = min(best["batch 1"], time.perf_counter() - t)
        t = time.perf_counter()
        up.upscale(reqs)
        best[f"batch {args.images}"] = min(best[f"batch {args.images}"], time.perf_counter() - t)

    t = time.perf_counter()
    enc.encode(images)
    sem = args.images / (time.perf_counter() - t)

    print(f"tiny preset, CPU, {torch.get_num_threads()} threads, {args.size}px inputs x4, {args.steps} steps, CFG on")
    rates = {k: args.images / v for k, v in best.items()}
    for k, v in rates.items():
        print(f"  SR {k:>9}: {v:8.2f} images/s")
    print(f"  ratio batch {args.images} / batch 1: {rates[f'batch {args.images}'] / rates['batch 1']:.2f}x")
    print(f"  semantic encoder (tiny SAM2, batch {args.images}): {sem:.1f} images/s")


if __name__ == "__main__":
    main()
