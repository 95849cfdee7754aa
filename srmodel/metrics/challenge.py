"""Full-reference metrics as the NTIRE 2025 KwaiSR challenge computes them, and its Score.

BasicSR's `calculate_psnr` / `calculate_ssim` with `test_y_channel=True`: Y of
BT.601 (studio range, 16-235) from RGB, `crop_border` pixels cut from every
side, values on the 0-255 scale, SSIM with an 11x11 Gaussian window (sigma 1.5)
in valid mode. Written here rather than taken from a library because none
implements exactly this protocol, and everything is float64 (BasicSR converts
to Y in float32; the difference is below 1e-4 dB). Pure numpy, no torch.
"""

from __future__ import annotations

import math

import numpy as np

# BT.601 luma on 0-255 (BasicSR's rgb2ycbcr / bgr2ycbcr, y_only=True).
Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64) / 255.0
C1 = (0.01 * 255.0) ** 2
C2 = (0.03 * 255.0) ** 2
WINDOW = 11
SIGMA = 1.5


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB on 0-255 -> (H, W) float64 Y in [16, 235]; a (H, W) array is taken as Y already."""
    img = np.asarray(rgb, dtype=np.float64)
    if img.ndim == 2:
        return img
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    return img @ Y_WEIGHTS + 16.0


def _prepare(sr: np.ndarray, gt: np.ndarray, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    if sr.shape != gt.shape:
        raise ValueError(f"SR and GT differ in size: SR {_size(sr)} vs GT {_size(gt)}")
    a, b = rgb_to_y(sr), rgb_to_y(gt)
    if crop_border:
        if min(a.shape[:2]) <= 2 * crop_border:
            raise ValueError(f"image {_size(sr)} is too small for crop_border={crop_border}")
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    return a, b


def _size(img: np.ndarray) -> str:
    return f"{img.shape[1]}x{img.shape[0]}" if img.ndim >= 2 else str(img.shape)


def psnr_y(sr: np.ndarray, gt: np.ndarray, crop_border: int = 4) -> float:
    """PSNR (dB) on Y; +inf for identical images (as BasicSR)."""
    a, b = _prepare(sr, gt, crop_border)
    mse = np.mean((a - b) ** 2)
    return math.inf if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def gaussian_kernel(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    """cv2.getGaussianKernel(size, sigma) in float64: sampled at integer offsets, sums to 1."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    k = np.exp(-(x**2) / (2.0 * sigma**2))
    return k / k.sum()


def _filter_valid(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """2-D correlation with the separable window outer(k, k), keeping only fully covered pixels.

    Equal to BasicSR's cv2.filter2D(...)[5:-5, 5:-5]; the window is symmetric so
    correlation and convolution agree.
    """
    rows = np.lib.stride_tricks.sliding_window_view(img, k.size, axis=0) @ k
    return np.lib.stride_tricks.sliding_window_view(rows, k.size, axis=1) @ k


def ssim_y(sr: np.ndarray, gt: np.ndarray, crop_border: int = 4) -> float:
    """Mean SSIM on Y with an 11x11 Gaussian window (sigma 1.5), valid region only."""
    a, b = _prepare(sr, gt, crop_border)
    if min(a.shape) < WINDOW:
        raise ValueError(f"image is too small for SSIM: {min(a.shape)} px after the crop, the window is {WINDOW}")
    k = gaussian_kernel()
    mu1, mu2 = _filter_valid(a, k), _filter_valid(b, k)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1 = _filter_valid(a * a, k) - mu1_sq
    s2 = _filter_valid(b * b, k) - mu2_sq
    s12 = _filter_valid(a * b, k) - mu12
    ssim_map = ((2 * mu12 + C1) * (2 * s12 + C2)) / ((mu1_sq + mu2_sq + C1) * (s1 + s2 + C2))
    return float(ssim_map.mean())


# The challenge's Score (EVALUATION.md): full-reference terms on the synthetic subset,
# no-reference terms on the wild subset; None unless every term is known.
SCORE_WEIGHTS = {"psnr": 1.0, "ssim": 10.0, "lpips": -10.0, "musiq": 0.1, "maniqa": 10.0, "clipiqa": 10.0}


def challenge_score(means: dict) -> float | None:
    values = [means.get(k) for k in SCORE_WEIGHTS]
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    return float(sum(w * means[k] for k, w in SCORE_WEIGHTS.items()))
