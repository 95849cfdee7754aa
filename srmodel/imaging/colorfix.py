"""Colour correction of a super-resolved image against its low-res reference.

Diffusion SR tends to drift in global colour; SeeSR corrects this after
decoding by borrowing the colour statistics (AdaIN) or the low-frequency
band (wavelet) of the upsampled input. These are re-implementations of
SeeSR's ``utils/wavelet_color_fix.py`` on batched tensors.

All functions take float tensors (B, C, H, W) in [0, 1] (C is 3 for RGB),
compute in float32 whatever the input dtype (half-precision variance and
repeated blurs lose too much precision), and return the target's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "COLOR_FIX_METHODS",
    "adain_color_fix",
    "wavelet_decompose",
    "wavelet_color_fix",
    "color_fix",
]

COLOR_FIX_METHODS = ("adain", "wavelet", "none")

# 3x3 binomial (B3-spline-like) kernel of SeeSR's wavelet_blur.
_KERNEL = (
    torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=torch.float32)
    / 16.0
)


def _check_pair(target: torch.Tensor, source: torch.Tensor) -> None:
    if target.dim() != 4:
        raise ValueError(f"target must be (B, C, H, W), got shape {tuple(target.shape)}")
    if source.shape != target.shape:
        raise ValueError(
            f"source shape {tuple(source.shape)} must equal target shape {tuple(target.shape)}"
        )


def _mean_std(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image/channel mean and sqrt(unbiased var + eps), as SeeSR's calc_mean_std."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    # Unbiased variance (torch default) + eps before sqrt, matching SeeSR
    # exactly.  A 1-pixel image has NaN unbiased variance (NaN in SeeSR too);
    # treat it as 0 so the output stays finite.
    var = flat.var(dim=2).nan_to_num(0.0) + eps
    return flat.mean(dim=2).view(b, c, 1, 1), var.sqrt().view(b, c, 1, 1)


def adain_color_fix(
    target: torch.Tensor, source: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Give `target` the per-channel mean/std of `source` (AdaIN); clamped to [0, 1]."""
    _check_pair(target, source)
    t = target.float()
    s = source.float()
    t_mean, t_std = _mean_std(t, eps)
    s_mean, s_std = _mean_std(s, eps)
    out = (t - t_mean) / t_std * s_std + s_mean
    return out.clamp_(0.0, 1.0).to(target.dtype)


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Depthwise 3x3 binomial blur with dilation `radius`, replicate padding."""
    c = x.shape[1]
    kernel = _KERNEL.to(device=x.device, dtype=x.dtype).expand(c, 1, 3, 3)
    # Replicate (not reflect) works for any pad size, so tiny images are fine.
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=c, dilation=radius)


def wavelet_decompose(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """À-trous wavelet split of x into (high, low) with high + low == x.

    Level i blurs with dilation 2**i; high accumulates x - blur(x) per level
    and low is the final blurred residual.  Computed in float32.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    x = x.float()
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2**i)
        high += x - low
        x = low
    return high, x


def wavelet_color_fix(
    target: torch.Tensor, source: torch.Tensor, levels: int = 5
) -> torch.Tensor:
    """Target's high frequencies + source's low-frequency residual; clamped to [0, 1]."""
    _check_pair(target, source)
    high, _ = wavelet_decompose(target, levels)
    _, low = wavelet_decompose(source, levels)
    return (high + low).clamp_(0.0, 1.0).to(target.dtype)


def color_fix(target: torch.Tensor, source: torch.Tensor, method: str) -> torch.Tensor:
    """Dispatch to a colour fix: method is "adain", "wavelet" or "none" (target as is)."""
    if method == "adain":
        return adain_color_fix(target, source)
    if method == "wavelet":
        return wavelet_color_fix(target, source)
    if method == "none":
        return target
    raise ValueError(
        f"unknown color fix method {method!r}; allowed values: {', '.join(COLOR_FIX_METHODS)}"
    )
