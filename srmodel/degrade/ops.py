"""Batched image operations of the Real-ESRGAN degradation model.

Images are float tensors (B, C, H, W) in [0, 1]. The ops are deterministic
given their inputs: all randomness comes from an explicit ``torch.Generator``
(noise) or is decided by the caller (kernels, scales, JPEG qualities), so the
pipeline that builds training pairs can record and replay every draw.
Nothing here clamps unless stated: Real-ESRGAN clamps between stages, and the
caller does the same.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "RESIZE_MODES",
    "filter2d",
    "resize",
    "gaussian_noise",
    "poisson_noise",
    "jpeg",
    "gaussian_kernel_1d",
    "usm_sharpen",
]

RESIZE_MODES = ("area", "bilinear", "bicubic")


def _per_sample(value, b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scalar or (B,) value as a (B, 1, 1, 1) tensor for broadcasting over images."""
    t = torch.as_tensor(value, dtype=dtype, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(b)
    if t.numel() != b:
        raise ValueError(f"expected one value per image ({b}), got {t.numel()}")
    return t.reshape(b, 1, 1, 1)


def filter2d(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter each image with its own kernel (cross-correlation, like cv2.filter2D), same size out.

    ``kernels``: (B, k, k) one per image, or (k, k) / (1, k, k) for all; k odd.
    Padding is reflect k//2 as in Real-ESRGAN; an image too small for that
    (side <= k//2, reflect is undefined) falls back to replicate padding.
    """
    b, c, h, w = x.shape
    if kernels.dim() == 2:
        kernels = kernels.unsqueeze(0)
    k = kernels.shape[-1]
    if k % 2 == 0 or kernels.shape[-2] != k:
        raise ValueError(f"kernels must be square with an odd size, got {tuple(kernels.shape)}")
    kernels = kernels.to(device=x.device, dtype=x.dtype)
    p = k // 2
    x = F.pad(x, (p, p, p, p), mode="reflect" if p < min(h, w) else "replicate")
    if kernels.shape[0] == 1:
        return F.conv2d(x.reshape(b * c, 1, h + 2 * p, w + 2 * p), kernels.reshape(1, 1, k, k)).reshape(b, c, h, w)
    if kernels.shape[0] != b:
        raise ValueError(f"got {kernels.shape[0]} kernels for {b} images")
    # Depthwise: every (image, channel) plane is a group, with its image's kernel repeated over channels.
    weight = kernels.reshape(b, 1, k, k).repeat_interleave(c, dim=0)
    out = F.conv2d(x.reshape(1, b * c, h + 2 * p, w + 2 * p), weight, groups=b * c)
    return out.reshape(b, c, h, w)


def resize(
    x: torch.Tensor,
    size: tuple[int, int] | None = None,
    scale: float | None = None,
    mode: str = "bicubic",
) -> torch.Tensor:
    """F.interpolate to ``size`` (H, W) or by ``scale``, mode area/bilinear/bicubic.

    As Real-ESRGAN: align_corners=False and no antialiasing (downscaling
    aliases, which is part of the degradation). Bicubic may overshoot [0, 1].
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose from {', '.join(RESIZE_MODES)}")
    if (size is None) == (scale is None):
        raise ValueError("give exactly one of size and scale")
    align = None if mode == "area" else False
    if size is not None:
        return F.interpolate(x, size=(int(size[0]), int(size[1])), mode=mode, align_corners=align)
    return F.interpolate(x, scale_factor=float(scale), mode=mode, align_corners=align)


def gaussian_noise(
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    gray: torch.Tensor | bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x + N(0, sigma²) noise; sigma (B,) in [0, 1] units (i.e. sigma_255 / 255).

    Images flagged ``gray`` get one noise plane shared by all channels
    (luminance-only noise). Unlike BasicSR, which draws one gray plane for the
    whole batch, each image draws its own. Not clamped.
    """
    b, c, h, w = x.shape
    sigma = _per_sample(sigma, b, x.dtype, x.device)
    gray = _per_sample(gray, b, torch.bool, x.device)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if bool(gray.any()):
        plane = torch.randn((b, 1, h, w), generator=generator, dtype=x.dtype, device=x.device)
        noise = torch.where(gray, plane.expand(b, c, h, w), noise)
    return x + noise * sigma


def _poisson_residual(img: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Real-ESRGAN's Poisson rule on (B, C, H, W): noise = poisson(q·vals)/vals − q, q the 8-bit quantised image.

    vals (per image) is the number of distinct 8-bit levels rounded up to a
    power of two, so the noise strength follows the image's bit depth.
    """
    q = torch.clamp(torch.round(img * 255), 0, 255) / 255
    levels = torch.tensor([float(torch.unique(q[i]).numel()) for i in range(q.shape[0])], dtype=img.dtype)
    vals = (2 ** torch.ceil(torch.log2(levels))).to(img.device).reshape(-1, 1, 1, 1)
    out = torch.poisson(q * vals, generator=generator) / vals
    return out - q


def poisson_noise(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    gray: torch.Tensor | bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x + scale·(Poisson shot noise), Real-ESRGAN's rule (see ``_poisson_residual``); scale (B,).

    ``gray`` images take the noise of their luminance (0.299 R + 0.587 G +
    0.114 B) on every channel. Noise is computed from the quantised image but
    added to ``x`` itself. Not clamped.
    """
    b, c, h, w = x.shape
    scale = _per_sample(scale, b, x.dtype, x.device)
    gray = _per_sample(gray, b, torch.bool, x.device)
    # Quantising and Poisson sampling only make sense on non-negative values in [0, 1].
    src = x.clamp(0, 1)
    noise = _poisson_residual(src, generator)
    if bool(gray.any()):
        if c == 3:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
            lum = (src * weights).sum(dim=1, keepdim=True)
        else:
            lum = src.mean(dim=1, keepdim=True)
        noise = torch.where(gray, _poisson_residual(lum, generator).expand(b, c, h, w), noise)
    return x + noise * scale


def jpeg(x: torch.Tensor, quality: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A real JPEG encode/decode round trip per image with PIL (default 4:2:0 chroma subsampling).

    A real codec rather than a differentiable JPEG approximation (DiffJPEG, as
    in Real-ESRGAN's online training): the training targets are the artefacts
    of real JPEG files, and pairs are built offline so no gradient is needed.
    Input is clamped to [0, 1] and rounded to 8 bits first, as a file would
    be. ``quality`` is one int (1..100) for all or one per image. Returns float
    in [0, 1] with the input's dtype and device.
    """
    b, c, _, _ = x.shape
    if c not in (1, 3):
        raise ValueError(f"JPEG needs 1 or 3 channels, got {c}")
    q = torch.as_tensor(quality).reshape(-1).tolist()
    if len(q) == 1:
        q = q * b
    if len(q) != b:
        raise ValueError(f"expected one quality per image ({b}), got {len(q)}")
    u8 = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img, qi in zip(u8, q):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if c == 1 else img).save(buf, format="JPEG", quality=int(qi))
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert("L" if c == 1 else "RGB"))
        out.append(torch.from_numpy(dec.reshape(dec.shape[0], dec.shape[1], c).copy()))
    return (torch.stack(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype)) / 255


# OpenCV's fixed kernels for small sizes with sigma <= 0 (getGaussianKernel's table).
_CV_SMALL = {
    1: [1.0],
    3: [0.25, 0.5, 0.25],
    5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
    7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125],
}


def gaussian_kernel_1d(ksize: int, sigma: float = 0.0) -> torch.Tensor:
    """cv2.getGaussianKernel: float64 (ksize,); sigma <= 0 means 0.3·((ksize−1)·0.5 − 1) + 0.8."""
    if sigma <= 0:
        if ksize in _CV_SMALL:
            return torch.tensor(_CV_SMALL[ksize], dtype=torch.float64)
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    ax = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    g = torch.exp(-(ax * ax) / (2 * sigma * sigma))
    return g / g.sum()


def _separable_blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """filter2d with the kernel outer(g, g), done as two 1-D passes (same result, ~k/2 times cheaper at k = 51)."""
    b, c, h, w = x.shape
    k = g.numel()
    p = k // 2
    g = g.to(device=x.device, dtype=x.dtype)
    x = F.pad(x, (p, p, p, p), mode="reflect" if p < min(h, w) else "replicate").reshape(b * c, 1, h + 2 * p, w + 2 * p)
    x = F.conv2d(x, g.reshape(1, 1, 1, k))
    return F.conv2d(x, g.reshape(1, 1, k, 1)).reshape(b, c, h, w)


def usm_sharpen(x: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> torch.Tensor:
    """Unsharp masking of the Real-ESRGAN training target (BasicSR's USMSharp).

    blur = Gaussian blur (OpenCV sigma rule for sigma 0, reflect padding);
    residual = x − blur; mask = |residual|·255 > threshold, softened by the
    same blur; out = soft_mask·clamp(x + weight·residual, 0, 1) + (1 − soft_mask)·x.
    As in BasicSR, ``radius`` is the kernel *size* (made odd): the default 50
    gives a 51×51 kernel with sigma 8.0.
    """
    k = radius + 1 if radius % 2 == 0 else radius
    g = gaussian_kernel_1d(k)
    blur = _separable_blur(x, g)
    residual = x - blur
    mask = (residual.abs() * 255 > threshold).to(x.dtype)
    soft_mask = _separable_blur(mask, g)
    sharp = torch.clamp(x + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * x
