"""Degradation throughput: 512x512 GT crops per second for each preset, side by side in one run.

    python bench/degrade_cpu.py [--crops 40] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from srmodel.degrade.config import PRESETS
from srmodel.degrade.model import degrade_group


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crops", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    gt = torch.from_numpy(rng.random((args.crops, 3, 512, 512), dtype=np.float32)).to(args.device)
    print(f"{args.crops} crops of 512x512, {args.device}, {torch.get_num_threads()} threads")
    for name, cfg in PRESETS.items():
        g = cfg.choice_group
        t = time.perf_counter()
        for k, start in enumerate(range(0, args.crops, g)):
            degrade_group(gt[start : start + g], cfg, seed=k)
        print(f"  {name:>10}: {args.crops / (time.perf_counter() - t):7.2f} crops/s (groups of {g})")


if __name__ == "__main__":
    main()
