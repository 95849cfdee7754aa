"""The release's tiled VAE: overlapping tiles whose GroupNorm statistics are shared across tiles.

The authors decode through multidiffusion's `VAEHook` (NTIRE-2025-SRlab `utils/vaehook.py`, from
pkuliyi2015's sd-webui-stablesr). This module restates what it computes, in our own code, for the
settings the release uses (`fast_decoder=False`, `fast_encoder=False`, `color_fix=False`):

* below a size threshold (longest latent side <= tile + 2*pad for the decoder, pixels for the
  encoder) the ordinary forward runs;
* above it the input is cut into tiles (`split_tiles`, pad 11 latent px for the decoder, 32 px for
  the encoder), every tile runs the network one layer at a time, and at each GroupNorm the
  per-tile (biased) variance and mean are averaged over tiles weighted by tile area, then every
  tile is normalised with those shared statistics. Everything else (convolutions, the mid-block
  attention, up/down-sampling) sees one tile only;
* each tile's valid region is written into a float32 result.

The order in which tiles enter the shared statistics alternates (forward, then backward, ...) as
in the hook, so the float32 sums match it too. diffusers' own tiled VAE (used by the exact-size
path) blends independently normalised tiles instead and gives other pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DECODER_PAD", "ENCODER_PAD", "needs_tiling", "split_tiles", "tiled_forward"]

DECODER_PAD = 11  # latent pixels of context around a decoder tile
ENCODER_PAD = 32  # image pixels of context around an encoder tile

Box = list[int]  # [x0, x1, y0, y1]
Op = tuple[str, Callable | nn.Module | None]  # ("run" | "norm" | "keep" | "add", fn)


def needs_tiling(height: int, width: int, tile: int, pad: int) -> bool:
    """The hook's rule: tile only when the longest side exceeds tile + 2*pad."""
    return max(height, width) > pad * 2 + tile


def _best_tile_size(lower: int, upper: int) -> int:
    # The hook rounds the tile up to a multiple of 32, 16, ... 2 when that still fits.
    divider = 32
    while divider >= 2:
        remainder = lower % divider
        if remainder == 0:
            return lower
        candidate = lower - remainder + divider
        if candidate <= upper:
            return candidate
        divider //= 2
    return lower


def split_tiles(height: int, width: int, tile: int, pad: int, is_decoder: bool) -> tuple[list[Box], list[Box]]:
    """Input boxes (with context) and output boxes (in output pixels) of every tile, row-major."""
    n_h = max(math.ceil((height - 2 * pad) / tile), 1)
    n_w = max(math.ceil((width - 2 * pad) / tile), 1)
    tile_h = _best_tile_size(math.ceil((height - 2 * pad) / n_h), tile)
    tile_w = _best_tile_size(math.ceil((width - 2 * pad) / n_w), tile)
    inputs, outputs = [], []
    for i in range(n_h):
        for j in range(n_w):
            core = [
                pad + j * tile_w,
                min(pad + (j + 1) * tile_w, width),
                pad + i * tile_h,
                min(pad + (i + 1) * tile_h, height),
            ]
            # Tiles next to a border own the border strip too.
            out = [
                core[0] if core[0] > pad else 0,
                core[1] if core[1] < width - pad else width,
                core[2] if core[2] > pad else 0,
                core[3] if core[3] < height - pad else height,
            ]
            outputs.append([v * 8 if is_decoder else v // 8 for v in out])
            inputs.append([max(0, core[0] - pad), min(width, core[1] + pad), max(0, core[2] - pad), min(height, core[3] + pad)])
    return inputs, outputs


def _attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The VAE mid-block attention without its norm and residual (both are separate ops here)."""
    b, c, h, w = x.shape
    seq = x.view(b, c, h * w).transpose(1, 2)
    q, k, v = attn.to_q(seq), attn.to_k(seq), attn.to_v(seq)
    heads = attn.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1])
    out = attn.to_out[1](attn.to_out[0](out))
    return out.transpose(-1, -2).reshape(b, c, h, w)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def _resnet_ops(block: nn.Module) -> list[Op]:
    shortcut = block.conv_shortcut if block.conv_shortcut is not None else _identity
    return [
        ("keep", shortcut),
        ("norm", block.norm1),
        ("run", _silu),
        ("run", block.conv1),
        ("norm", block.norm2),
        ("run", _silu),
        ("run", block.conv2),
        ("add", None),
    ]


def _mid_ops(mid: nn.Module) -> list[Op]:
    attn = mid.attentions[0]
    return [
        *_resnet_ops(mid.resnets[0]),
        ("keep", _identity),
        ("norm", attn.group_norm),
        ("run", lambda x, attn=attn: _attention(attn, x)),
        ("add", None),
        *_resnet_ops(mid.resnets[1]),
    ]


def network_ops(net: nn.Module, is_decoder: bool) -> list[Op]:
    """diffusers' VAE Encoder/Decoder forward as a flat list of per-tile ops."""
    ops: list[Op] = [("run", net.conv_in)]
    if is_decoder:
        ops += _mid_ops(net.mid_block)
        for block in net.up_blocks:
            for resnet in block.resnets:
                ops += _resnet_ops(resnet)
            if block.upsamplers is not None:
                ops.append(("run", block.upsamplers[0]))
    else:
        for block in net.down_blocks:
            for resnet in block.resnets:
                ops += _resnet_ops(resnet)
            if block.downsamplers is not None:
                ops.append(("run", block.downsamplers[0]))
        ops += _mid_ops(net.mid_block)
    ops += [("norm", net.conv_norm_out), ("run", _silu), ("run", net.conv_out)]
    return ops


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c = x.shape[:2]
    return x.contiguous().view(1, b * groups, c // groups, *x.shape[2:])


def _var_mean(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(_grouped(x, groups), dim=[0, 2, 3, 4], unbiased=False)
    if var.dtype == torch.float16 and var.isinf().any():  # large activations overflow fp16 variance
        var, mean = torch.var_mean(_grouped(x.float(), groups), dim=[0, 2, 3, 4], unbiased=False)
    return var, mean


def _shared_norm(tiles: Sequence[torch.Tensor], order: Sequence[int], norm: nn.GroupNorm) -> list[torch.Tensor]:
    """Normalise every tile with the area-weighted average of the tiles' statistics."""
    stats = [_var_mean(tiles[i], norm.num_groups) for i in order]
    areas = [tiles[i].shape[2] * tiles[i].shape[3] for i in order]
    var = torch.vstack([v for v, _ in stats])
    mean = torch.vstack([m for _, m in stats])
    weight = torch.tensor(areas, dtype=torch.float32, device=var.device) / max(areas)
    weight = (weight / weight.sum()).unsqueeze(1)
    var, mean = (var * weight).sum(dim=0), (mean * weight).sum(dim=0)
    out = []
    for x in tiles:
        y = F.batch_norm(_grouped(x, norm.num_groups), mean, var, training=False, momentum=0, eps=norm.eps)
        y = y.view(x.shape)
        if norm.weight is not None:
            y = y * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
        out.append(y)
    return out


@torch.no_grad()
def tiled_forward(net: nn.Module, x: torch.Tensor, tile: int, pad: int, is_decoder: bool) -> torch.Tensor:
    """Run a VAE Encoder/Decoder over tiles of x with shared GroupNorm statistics; float32 result."""
    n, _, height, width = x.shape
    in_boxes, out_boxes = split_tiles(height, width, tile, pad, is_decoder)
    tiles = [x[:, :, y0:y1, x0:x1] for x0, x1, y0, y1 in in_boxes]
    kept: list[torch.Tensor | None] = [None] * len(tiles)
    forward = True
    for kind, fn in network_ops(net, is_decoder):
        if kind == "norm":
            order = range(len(tiles)) if forward else reversed(range(len(tiles)))
            tiles = _shared_norm(tiles, list(order), fn)
            forward = not forward
        elif kind == "keep":
            kept = [fn(t) for t in tiles]
        elif kind == "add":
            tiles = [t + r for t, r in zip(tiles, kept)]
            kept = [None] * len(tiles)
        else:
            tiles = [fn(t) for t in tiles]
    def to_out(v: int) -> int:
        return v * 8 if is_decoder else v // 8

    result = torch.zeros((n, tiles[0].shape[1], to_out(height), to_out(width)), device=x.device)
    for t, box, (ox0, ox1, oy0, oy1) in zip(tiles, in_boxes, out_boxes):
        px0, px1, py0, py1 = (to_out(v) for v in box)
        # The hook's crop: margins from the tile's nominal box, the far end relative to its real size.
        result[:, :, oy0:oy1, ox0:ox1] = t[:, :, oy0 - py0 : t.shape[2] + oy1 - py1, ox0 - px0 : t.shape[3] + ox1 - px1]
    return result
