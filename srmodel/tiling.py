"""Latent tiling: overlapping tiles with Gaussian blend weights.

All tiles of all images go through the UNet as one batch (chunked to a
maximum batch), unlike the release, which ran one tile per forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    image: int  # index in the batch
    y: int
    x: int
    h: int
    w: int


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts covering [0, length) with tiles of `tile` overlapping by at least `overlap`; the last snaps to the end."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > overlap >= 0, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(n)})


def tile_grid(height: int, width: int, tile: int, overlap: int, image: int = 0) -> list[Tile]:
    th, tw = min(tile, height), min(tile, width)
    return [
        Tile(image, y, x, th, tw)
        for y in tile_starts(height, tile, overlap)
        for x in tile_starts(width, tile, overlap)
    ]


def gaussian_weights(h: int, w: int, var: float = 0.01) -> torch.Tensor:
    """Symmetric Gaussian window (the release's var 0.01 relative to tile size, centred for both axes)."""

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64)
        mid = (n - 1) / 2
        return torch.exp(-((pos - mid) ** 2) / (n * n) / (2 * var))

    return axis(h)[:, None] * axis(w)[None, :]


def blend_weights(height: int, width: int, tiles: list[Tile], var: float = 0.01) -> list[torch.Tensor]:
    """Per-tile weights normalised so that, at every latent pixel, the tiles' weights sum to one."""
    total = torch.zeros(height, width, dtype=torch.float64)
    raw = []
    for t in tiles:
        g = torch.ones(t.h, t.w, dtype=torch.float64) if len(tiles) == 1 else gaussian_weights(t.h, t.w, var)
        raw.append(g)
        total[t.y : t.y + t.h, t.x : t.x + t.w] += g
    if (total <= 0).any():
        raise AssertionError("tile grid leaves latent pixels uncovered")
    return [g / total[t.y : t.y + t.h, t.x : t.x + t.w] for g, t in zip(raw, tiles)]
