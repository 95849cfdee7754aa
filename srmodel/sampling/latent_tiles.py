"""Latent tiling: overlapping tiles with Gaussian blend weights.

Two rules (`TilingRule`):

* ``release`` (the authors' pipeline_seesr.py): tile when h*w > tile², with square tiles of side
  min(tile, h, w); the blend window is centred at (side-1)/2 across and side/2 down, as released.
* ``exact-size`` (ours): tile when either side exceeds the tile, rectangular tiles
  min(tile, h) x min(tile, w), a window centred on both axes.

Either way all tiles of all images go through the UNet in shared batches (chunked to a maximum
batch), unlike the release, which ran one tile per forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


TilingRule = Literal["release", "exact-size"]


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


def release_tile_grid(height: int, width: int, tile: int, overlap: int, image: int = 0) -> list[Tile]:
    """The release's grid: none below tile² latent pixels, else square tiles of side min(tile, h, w).

    The release loops forever when that side is not larger than the overlap (a latent side <= 32,
    i.e. images under 264 px on one side and long on the other); there the overlap is capped at
    half the side so such images finish.
    """
    if height * width <= tile * tile:
        return [Tile(image, 0, 0, height, width)]
    side = min(tile, height, width)
    overlap = min(overlap, side // 2)
    return [
        Tile(image, y, x, side, side)
        for y in tile_starts(height, side, overlap)
        for x in tile_starts(width, side, overlap)
    ]


def plan_tiles(height: int, width: int, tile: int | None, overlap: int, rule: TilingRule, image: int = 0) -> list[Tile]:
    """The tiles of one (height, width) latent under `rule`; one whole-image tile when untiled."""
    if tile is None:
        return [Tile(image, 0, 0, height, width)]
    if rule == "release":
        return release_tile_grid(height, width, tile, overlap, image)
    if height <= tile and width <= tile:
        return [Tile(image, 0, 0, height, width)]
    return tile_grid(height, width, tile, overlap, image)


def gaussian_weights(h: int, w: int, var: float = 0.01, rule: TilingRule = "exact-size") -> torch.Tensor:
    """Gaussian window with the release's variance 0.01 relative to the tile size.

    exact-size: centred at (n-1)/2 on both axes. release: centred at (w-1)/2 across but h/2 down,
    as pipeline_seesr.py's `_gaussian_weights` has it (its constant factor cancels in the blend).
    """

    def axis(n: int, mid: float) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64)
        return torch.exp(-((pos - mid) ** 2) / (n * n) / (2 * var))

    y_mid = h / 2 if rule == "release" else (h - 1) / 2
    return axis(h, y_mid)[:, None] * axis(w, (w - 1) / 2)[None, :]


def blend_weights(
    height: int, width: int, tiles: list[Tile], var: float = 0.01, rule: TilingRule = "exact-size"
) -> list[torch.Tensor]:
    """Per-tile weights normalised so that, at every latent pixel, the tiles' weights sum to one."""
    total = torch.zeros(height, width, dtype=torch.float64)
    raw = []
    for t in tiles:
        g = torch.ones(t.h, t.w, dtype=torch.float64) if len(tiles) == 1 else gaussian_weights(t.h, t.w, var, rule)
        raw.append(g)
        total[t.y : t.y + t.h, t.x : t.x + t.w] += g
    if (total <= 0).any():
        raise AssertionError("tile grid leaves latent pixels uncovered")
    return [g / total[t.y : t.y + t.h, t.x : t.x + t.w] for g, t in zip(raw, tiles)]
