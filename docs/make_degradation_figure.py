"""Writes docs/degradations.png: one HR crop under each degradation preset and branch.

    python docs/make_degradation_figure.py

The HR crop is drawn here (no third-party photo), so the figure is reproducible anywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from srmodel.degrade.config import PRESETS
from srmodel.degrade.model import degrade_group

OUT = Path(__file__).parent / "degradations.png"


def hr_crop(size: int = 512) -> torch.Tensor:
    rng = np.random.default_rng(3)
    img = Image.new("RGB", (size, size), (230, 225, 210))
    d = ImageDraw.Draw(img)
    for k in range(0, size, 8):  # fine stripes: blur and aliasing show here
        d.line([(k, 0), (k + size // 4, size // 2)], fill=(90, 90, 110), width=1)
    for _ in range(25):
        x, y, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(10, 60))]
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    for k in range(6):
        d.text((20, 300 + 30 * k), "ugcsr degradation 0123456789", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]


def find_branch(cfg, gt, branch: str):
    for seed in range(200):  # the branch is a seeded draw: take the first seed that gives it
        target, lr, params = degrade_group(gt, cfg, seed)
        if params[0]["branch"] == branch:
            return target, lr, seed
    raise RuntimeError(f"no {branch} draw in 200 seeds")


def main() -> None:
    gt = hr_crop()
    panels = [("HR (input)", gt)]
    target, lr, seed = find_branch(PRESETS["paper"], gt, "clean")
    panels += [("paper target (USM)", target), (f"paper clean x4 (seed {seed})", lr)]
    _, lr, seed = find_branch(PRESETS["paper"], gt, "degrade")
    panels.append((f"paper degrade x4 (seed {seed})", lr))
    _, lr, seed = find_branch(PRESETS["realesrgan"], gt, "degrade")
    panels.append((f"realesrgan x4 (seed {seed})", lr))
    _, lr, seed = find_branch(PRESETS["ugc"], gt, "degrade")
    panels.append((f"ugc x4 (seed {seed})", lr))
    tile = 256
    canvas = Image.new("RGB", (tile * len(panels), tile + 24), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (label, x) in enumerate(panels):
        arr = (x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        # LR panels are shown with nearest-neighbour upsampling so their pixels stay visible
        canvas.paste(Image.fromarray(arr).resize((tile, tile), Image.NEAREST), (k * tile, 24))
        draw.text((k * tile + 4, 6), label, fill=(0, 0, 0))
    canvas.save(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
