"""RAM tagger throughput at 384x384 inputs: batch 1 vs batch 8, side by side in one run.

    python bench/tagger_cpu.py            # a narrow Swin at the real 384 input, CPU
    python bench/tagger_cpu.py --real     # the real Swin-L + head size (random weights; for a GPU)

Random weights: this measures compute, not tags.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from srmodel.ram import RAMConfig, RAMTagger

NARROW = RAMConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), proj_dim=24, head_hidden=32,
                   head_heads=2, head_intermediate=64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    config = RAMConfig() if args.real else NARROW
    model = RAMTagger(config, [f"t{i}" for i in range(config.num_classes)], torch.full((config.num_classes,), 0.9))
    model.refresh_label_queries()
    model = model.to(args.device).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(8)]
    model(images[:1])  # warm-up
    rates = {}
    for batch in (1, 8):
        best = float("inf")
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            for start in range(0, 8, batch):
                model(images[start : start + batch])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        rates[batch] = 8 / best
    size = "Swin-L (real size)" if args.real else "narrow Swin (embed 16)"
    print(f"RAM tagger, {size}, 384x384, fp32, {args.device}, {torch.get_num_threads()} threads")
    for b, r in rates.items():
        print(f"  batch {b}: {r:8.2f} images/s")
    print(f"  ratio batch 8 / batch 1: {rates[8] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
