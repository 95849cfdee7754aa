"""Blur kernels of the Real-ESRGAN degradation model.

Re-implemented from the formulas of Real-ESRGAN (Wang et al., 2021) as used in
BasicSR's ``degradations.py`` / ``realesrgan_dataset.py``: Gaussian, generalized
Gaussian and plateau kernels (isotropic or rotated anisotropic), and the 2-D
sinc (Airy) low-pass kernel that mimics ringing/overshoot artefacts.

Every kernel is a float32 torch tensor of shape (k, k) that sums to 1; the
maths is done in float64 so that tiny sigmas (0.01) and betas stay exact.
All randomness comes from a ``numpy.random.Generator`` passed in, so a draw is
reproducible from its seed, and every draw returns a JSON-serialisable params
dict recording the type and each sampled value.

Coordinates: a kernel is indexed ``[row, col] = [y, x]``; ``theta`` rotates
the (x, y) covariance counter-clockwise in that frame.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "KERNEL_TYPES",
    "KERNEL_RANGE",
    "PAD_SIZE",
    "sigma_matrix",
    "mesh_grid",
    "bivariate_gaussian",
    "bivariate_generalized_gaussian",
    "bivariate_plateau",
    "circular_lowpass_kernel",
    "pulse_kernel",
    "pad_kernel",
    "random_mixed_kernel",
    "sample_blur_kernel",
    "sample_final_sinc",
]

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
# Real-ESRGAN's kernel sizes: odd, 7..21.
KERNEL_RANGE = tuple(range(7, 22, 2))
# Every sampled kernel is zero-padded to this size so a batch can be stacked.
PAD_SIZE = 21

_F64 = torch.float64


def sigma_matrix(sx: float, sy: float, theta: float) -> torch.Tensor:
    """Covariance R diag(sx², sy²) Rᵀ with R the rotation by ``theta`` (radians), float64 (2, 2)."""
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=_F64)
    return rot @ torch.diag(torch.tensor([sx * sx, sy * sy], dtype=_F64)) @ rot.T


def mesh_grid(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(xx, yy), each float64 (k, k): centred coordinates -(k-1)/2 … (k-1)/2; xx varies along columns."""
    ax = torch.arange(k, dtype=_F64) - (k - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _quadratic_form(k: int, sx: float, sy: float, theta: float, isotropic: bool) -> torch.Tensor:
    """xᵀ Σ⁻¹ x on the k×k grid (float64)."""
    if isotropic:
        sy, theta = sx, 0.0
    inv = torch.linalg.inv(sigma_matrix(sx, sy, theta))
    xx, yy = mesh_grid(k)
    return inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy


def _normalise(kernel: torch.Tensor) -> torch.Tensor:
    return (kernel / kernel.sum()).to(torch.float32)


def bivariate_gaussian(k: int, sx: float, sy: float, theta: float, isotropic: bool = True) -> torch.Tensor:
    """exp(-0.5 xᵀ Σ⁻¹ x), normalised. ``isotropic`` ignores sy/theta (sy = sx, theta = 0)."""
    return _normalise(torch.exp(-0.5 * _quadratic_form(k, sx, sy, theta, isotropic)))


def bivariate_generalized_gaussian(
    k: int, sx: float, sy: float, theta: float, beta: float, isotropic: bool = True
) -> torch.Tensor:
    """exp(-0.5 (xᵀ Σ⁻¹ x)^beta), normalised: beta < 1 gives heavy tails, beta > 1 a flatter top."""
    return _normalise(torch.exp(-0.5 * torch.pow(_quadratic_form(k, sx, sy, theta, isotropic), beta)))


def bivariate_plateau(k: int, sx: float, sy: float, theta: float, beta: float, isotropic: bool = True) -> torch.Tensor:
    """1 / ((xᵀ Σ⁻¹ x)^beta + 1), normalised."""
    return _normalise(1.0 / (torch.pow(_quadratic_form(k, sx, sy, theta, isotropic), beta) + 1.0))


def pad_kernel(kernel: torch.Tensor, size: int = PAD_SIZE) -> torch.Tensor:
    """Zero-pad an odd (k, k) kernel to (size, size), keeping it centred (no-op if k >= size)."""
    k = kernel.shape[-1]
    if k >= size:
        return kernel
    p = (size - k) // 2
    return torch.nn.functional.pad(kernel, (p, p, p, p))


def circular_lowpass_kernel(cutoff: float, k: int, pad_to: int = 0) -> torch.Tensor:
    """2-D sinc (Airy) kernel: cutoff·J1(cutoff·r)/(2πr), centre cutoff²/(4π); normalised, zero-padded to ``pad_to``.

    ``cutoff`` is the angular cut-off frequency in radians/pixel (π = Nyquist).
    Sinc kernels have negative lobes: that is what makes the ringing artefacts.
    """
    if k % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {k}")
    xx, yy = mesh_grid(k)
    r = torch.sqrt(xx * xx + yy * yy)
    # r == 0 is replaced by 1 before dividing to keep the grid NaN-free; the centre is set from the limit below.
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    kernel = cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r)
    c = (k - 1) // 2
    kernel[c, c] = cutoff**2 / (4 * math.pi)
    kernel = _normalise(kernel)
    return pad_kernel(kernel, pad_to) if pad_to > k else kernel


def pulse_kernel(size: int = PAD_SIZE) -> torch.Tensor:
    """The identity kernel: 1 at the centre, 0 elsewhere."""
    kernel = torch.zeros(size, size, dtype=torch.float32)
    kernel[size // 2, size // 2] = 1.0
    return kernel


def _sample_beta(rng: np.random.Generator, beta_range: Sequence[float]) -> float:
    """BasicSR's rule: with p 0.5 beta ~ U(lo, 1), else U(1, hi).

    When the range does not straddle 1 (e.g. the `paper` preset's [0.01, 0.02])
    one of the two halves would be an invalid interval, so beta ~ U(lo, hi)
    directly. Such tiny betas flatten the kernel into a near box blur over its
    whole window: a known quirk of that preset, kept on purpose.
    """
    lo, hi = float(beta_range[0]), float(beta_range[1])
    if hi <= 1.0 or lo >= 1.0:
        return float(rng.uniform(lo, hi))
    if rng.uniform() < 0.5:
        return float(rng.uniform(lo, 1.0))
    return float(rng.uniform(1.0, hi))


def random_mixed_kernel(
    rng: np.random.Generator,
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    kernel_size: int = 21,
    sigma_x_range: Sequence[float] = (0.6, 5.0),
    sigma_y_range: Sequence[float] = (0.6, 5.0),
    rotation_range: Sequence[float] = (-math.pi, math.pi),
    betag_range: Sequence[float] = (0.5, 8.0),
    betap_range: Sequence[float] = (0.5, 8.0),
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Draw one of the six kernel types with ``kernel_prob``, then its parameters.

    Draw order (fixed, for reproducibility): type, sigma_x, [sigma_y, theta if
    anisotropic], [beta if generalized/plateau]. Isotropic kernels record
    sigma_y = sigma_x and theta = 0. Returns (float32 (k, k) kernel, params).
    """
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {kernel_size}")
    p = np.asarray(kernel_prob, dtype=np.float64)
    # Renormalise: configs written by hand rarely sum to 1 to the last ulp, which numpy rejects.
    kernel_type = str(kernel_list[int(rng.choice(len(kernel_list), p=p / p.sum()))])
    if kernel_type not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kernel_type!r}; choose from {', '.join(KERNEL_TYPES)}")
    isotropic = kernel_type.endswith("_iso") or kernel_type == "iso"

    sx = float(rng.uniform(sigma_x_range[0], sigma_x_range[1]))
    if isotropic:
        sy, theta = sx, 0.0
    else:
        sy = float(rng.uniform(sigma_y_range[0], sigma_y_range[1]))
        theta = float(rng.uniform(rotation_range[0], rotation_range[1]))
    params: dict[str, Any] = {"type": kernel_type, "kernel_size": int(kernel_size), "sigma_x": sx, "sigma_y": sy,
                              "theta": theta}

    if kernel_type.startswith("generalized"):
        params["beta"] = _sample_beta(rng, betag_range)
        kernel = bivariate_generalized_gaussian(kernel_size, sx, sy, theta, params["beta"], isotropic)
    elif kernel_type.startswith("plateau"):
        params["beta"] = _sample_beta(rng, betap_range)
        kernel = bivariate_plateau(kernel_size, sx, sy, theta, params["beta"], isotropic)
    else:
        kernel = bivariate_gaussian(kernel_size, sx, sy, theta, isotropic)
    return kernel, params


def _cfg(cfg: Any, key: str) -> Any:
    """Read ``key`` from a mapping or an attribute object (pydantic model, namespace)."""
    return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)


def sample_blur_kernel(rng: np.random.Generator, cfg: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """One first/second-stage Real-ESRGAN blur kernel, always padded to 21×21.

    Size ~ uniform odd 7..21; with p ``sinc_prob`` a sinc kernel with
    omega_c ~ U(π/3, π) (size < 13) or U(π/5, π) (larger sizes, which can
    afford a lower cut-off), else ``random_mixed_kernel`` with sigma_x and
    sigma_y both from ``sigma_range`` and theta ~ U(-π, π).
    ``cfg`` keys: kernel_list, kernel_prob, sigma_range, betag_range,
    betap_range, sinc_prob.
    """
    kernel_size = int(KERNEL_RANGE[int(rng.integers(len(KERNEL_RANGE)))])
    if rng.uniform() < float(_cfg(cfg, "sinc_prob")):
        omega_c = float(rng.uniform(math.pi / 3, math.pi) if kernel_size < 13 else rng.uniform(math.pi / 5, math.pi))
        kernel = circular_lowpass_kernel(omega_c, kernel_size)
        params: dict[str, Any] = {"type": "sinc", "kernel_size": kernel_size, "omega_c": omega_c}
    else:
        sigma = _cfg(cfg, "sigma_range")
        kernel, params = random_mixed_kernel(
            rng, _cfg(cfg, "kernel_list"), _cfg(cfg, "kernel_prob"), kernel_size, sigma, sigma,
            (-math.pi, math.pi), _cfg(cfg, "betag_range"), _cfg(cfg, "betap_range"),
        )
    return pad_kernel(kernel, PAD_SIZE), params


def sample_final_sinc(
    rng: np.random.Generator, prob: float, omega_range: Sequence[float] = (math.pi / 3, math.pi)
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The final-stage kernel: with p ``prob`` a sinc (odd size 7..21, omega_c ~ U(omega_range)) else the pulse.

    Both are 21×21 so a batch mixing the two can be stacked.
    """
    if rng.uniform() < float(prob):
        kernel_size = int(KERNEL_RANGE[int(rng.integers(len(KERNEL_RANGE)))])
        omega_c = float(rng.uniform(omega_range[0], omega_range[1]))
        kernel = circular_lowpass_kernel(omega_c, kernel_size, pad_to=PAD_SIZE)
        return kernel, {"type": "sinc", "kernel_size": kernel_size, "omega_c": omega_c}
    return pulse_kernel(PAD_SIZE), {"type": "pulse"}
