"""The SR stage's GPU memory, and the largest UNet batch (`tiling.max_batch`) a GPU holds.

    need(rows) = RESERVED + weights(dtype) [+ SAM2's in the fused actor]
                 + max(MARGIN x (rows x per_row(dtype, tile) + intercept), VAE decode, SAM2 batch)

A row is one latent tile of one CFG branch in one ControlNet -> UNet forward (no_grad). The denoising
loop's activations and the VAE decode never live at the same time (the decode runs after the loop),
so the larger of the two counts. `pick_max_batch` returns the most rows whose need fits in
`fraction` of the memory the actor may use (the GPU's total x its Ray GPU share).

Where the figures come from:
- measured (`bench/sr_gpu_memory.py`, torch 2.14, the release configs built on `meta`, every tensor a
  forward allocates counted at torch's dispatcher by `live_bytes.LiveBytes`, attention counted as a
  fused kernel's output as flash / memory-efficient attention allocates on a GPU): WEIGHTS,
  PER_ROW (fitted over 1, 2, 4, 8 rows: exactly linear), VAE_DECODE (the decoder at the largest
  latent the release decodes untiled, 224 + 22);
- SAM2's activations per image counted the same way (the encoder on `meta`, batches 1, 2, 4); the
  semantic stage's weights from the released parameter counts (SAM 2.1 + RAM + DAPE, fp32);
- assumed, not measured (no GPU here): RESERVED (CUDA context, cuBLAS / cuDNN workspaces) and
  MARGIN (the caching allocator's fragmentation and cuDNN's convolution workspaces on activations).
  Check them against `torch.cuda.max_memory_reserved` on a GPU (bench/gpu_e2e.py records it).

srmodel never imports Ray: the actor passes its GPU share in.
"""

from __future__ import annotations

import torch

from ..config import DEFAULT_MAX_BATCH, ModelConfig

GIB = 2**30
MEASURED_TILE = 96  # latent tile the per-row figure is measured at; other tiles scale by area (checked at 64)

# bench/sr_gpu_memory.py: bytes of UNet + ControlNet + VAE + text encoder on the GPU (K/V unfolded).
WEIGHTS = {"fp16": 4_079_667_550, "fp32": 8_159_334_484}  # 3.80 / 7.60 GiB
# bench/sr_gpu_memory.py: one ControlNet -> UNet forward (no_grad, 4,096 SAM tokens), least squares over
# 1, 2, 4, 8 rows: bytes per row and intercept, by dtype and latent tile.
PER_ROW = {  # 0.181 GiB per fp16 row at 96 (a 768-px tile); intercept 0: the peak is exactly proportional
    ("fp16", 96): (194_415_104, 0), ("fp16", 64): (88_738_304, 0),
    ("fp32", 96): (388_830_208, 0), ("fp32", 64): (177_476_608, 0),
}
VAE_DECODE = {"fp16": 5_949_448_992, "fp32": 11_898_897_984}  # 5.54 / 11.08 GiB; bench/sr_gpu_memory.py: decoder peak at a 246 x 246 latent
SEMANTIC_WEIGHTS = (38_962_498 + 212_117_045 + 1_777_664) * 4  # SAM 2.1 + RAM Swin-L + DAPE, fp32 (as released)
# SAM 2.1 hiera-tiny's forward_image at 1024², fp32, counted like the UNet on meta (batches 1, 2, 4: 0.277,
# 0.516, 1.031 GiB): bytes per image. RAM's 384² Swin-L pass is smaller and runs before it.
SAM2_PER_IMAGE = 276_824_064

RESERVED = int(1.5 * GIB)  # assumed: CUDA context + library workspaces outside torch's allocator count
MARGIN = 1.25  # assumed: allocator fragmentation and cuDNN workspaces on top of the counted activations
FRACTION = 0.85  # share of the actor's GPU memory the plan may fill


def _dtype(dtype: str) -> str:
    return "fp32" if dtype == "fp32" else "fp16"  # bf16 has fp16's size


def per_row(dtype: str = "fp16", tile: int = MEASURED_TILE) -> tuple[float, float]:
    """(bytes per row, intercept) of a forward at `tile`; tiles other than the measured ones scale by area."""
    d = _dtype(dtype)
    if (d, tile) in PER_ROW:
        return PER_ROW[(d, tile)]
    slope, intercept = PER_ROW[(d, MEASURED_TILE)]
    scale = (tile / MEASURED_TILE) ** 2
    return slope * scale, intercept * scale


def sr_gpu_bytes(rows: int, dtype: str = "fp16", tile: int = MEASURED_TILE, *, semantic: bool = False,
                 semantic_batch: int = 8) -> int:
    """Peak GPU bytes of the SR actor running forwards of `rows` rows (with SAM2 too when fused)."""
    d = _dtype(dtype)
    slope, intercept = per_row(d, tile)
    fixed = RESERVED + WEIGHTS[d] + (SEMANTIC_WEIGHTS if semantic else 0)
    peaks = [MARGIN * (rows * slope + intercept), VAE_DECODE[d]]
    if semantic:
        peaks.append(MARGIN * semantic_batch * SAM2_PER_IMAGE)
    return int(fixed + max(peaks))


def pick_max_batch(gpu_bytes: int, dtype: str = "fp16", tile: int = MEASURED_TILE, *, cfg: bool = True,
                   share: float = 1.0, fraction: float = FRACTION, semantic: bool = False,
                   semantic_batch: int = 8) -> int:
    """The most rows whose `sr_gpu_bytes` fits in fraction x share x gpu_bytes (even with CFG: a
    tile's two branches stay together); at least 2 with CFG, 1 without, even when that does not fit."""
    budget = fraction * min(1.0, share) * gpu_bytes
    d = _dtype(dtype)
    slope, intercept = per_row(d, tile)

    def fits(rows: int) -> bool:
        return sr_gpu_bytes(rows, d, tile, semantic=semantic, semantic_batch=semantic_batch) <= budget

    # The linear part solved, then checked both ways (rounding; the VAE's constant may be the larger term).
    fixed = RESERVED + WEIGHTS[d] + (SEMANTIC_WEIGHTS if semantic else 0)
    rows = max(0, int(((budget - fixed) / MARGIN - intercept) // slope))
    while fits(rows + 1):
        rows += 1
    while rows > 0 and not fits(rows):
        rows -= 1
    step = 2 if cfg else 1
    return max(step, rows - rows % step)


def resolve_max_batch(config: ModelConfig, device, *, share: float = 1.0, semantic: bool = False,
                      semantic_batch: int = 8) -> int:
    """`config.tiling.max_batch` when set (the user's number wins); else the memory model's pick on a CUDA
    device, or the CPU default (16) without one."""
    if config.tiling.max_batch is not None:
        return config.tiling.max_batch
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_MAX_BATCH
    total = torch.cuda.get_device_properties(device).total_memory
    return pick_max_batch(total, config.dtype, config.tiling.latent_tile, cfg=config.sampler.cfg, share=share,
                          semantic=semantic, semantic_batch=semantic_batch)
