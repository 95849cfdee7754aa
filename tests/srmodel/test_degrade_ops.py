"""Real-ESRGAN degradation kernels and ops (srmodel.degrade.kernels / .ops)."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srmodel.degrade.kernels import (
    KERNEL_TYPES,
    bivariate_gaussian,
    bivariate_generalized_gaussian,
    bivariate_plateau,
    circular_lowpass_kernel,
    mesh_grid,
    random_mixed_kernel,
    sample_blur_kernel,
    sample_final_sinc,
    sigma_matrix,
)
from srmodel.degrade.ops import filter2d, gaussian_noise, jpeg, poisson_noise, resize, usm_sharpen

REALESRGAN_CFG = {
    "kernel_list": KERNEL_TYPES,
    "kernel_prob": (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
    "sigma_range": (0.2, 3.0),
    "betag_range": (0.5, 4.0),
    "betap_range": (1.0, 2.0),
    "sinc_prob": 0.1,
}
# The `paper` preset's ranges: everything in 0.01-0.02.
PAPER_RANGE = (0.01, 0.02)


def _texture(seed=0, size=128):
    """A smooth-ish random texture in [0, 1], (1, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    base = filter2d(torch.rand(1, 1, size, size, generator=g), bivariate_gaussian(7, 1.0, 1.0, 0))
    return (base - base.min()) / (base.max() - base.min())


# ---------------------------------------------------------------- kernels


def test_sigma_matrix_and_mesh_grid():
    s = sigma_matrix(2.0, 1.0, math.pi / 2)
    assert torch.allclose(s, torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)), atol=1e-12)
    xx, yy = mesh_grid(5)
    assert xx[0].tolist() == [-2, -1, 0, 1, 2] and yy[:, 0].tolist() == [-2, -1, 0, 1, 2]


@pytest.mark.parametrize(
    "make",
    [
        lambda: bivariate_gaussian(21, 2.0, 2.0, 0.0, True),
        lambda: bivariate_gaussian(15, 2.5, 0.7, 0.6, False),
        lambda: bivariate_generalized_gaussian(21, 2.0, 2.0, 0.0, 0.5, True),
        lambda: bivariate_generalized_gaussian(13, 2.0, 1.0, -1.2, 3.0, False),
        lambda: bivariate_plateau(21, 2.0, 2.0, 0.0, 1.5, True),
        lambda: bivariate_plateau(9, 1.5, 0.5, 2.0, 1.0, False),
    ],
)
def test_kernels_sum_to_one_and_nonnegative(make):
    k = make()
    assert k.dtype == torch.float32 and k.shape[0] == k.shape[1]
    assert abs(k.sum().item() - 1) < 1e-5
    assert (k >= 0).all()


def test_sinc_sums_to_one_and_has_negative_lobes():
    k = circular_lowpass_kernel(math.pi / 2, 21)
    assert k.shape == (21, 21) and abs(k.sum().item() - 1) < 1e-5
    assert (k < 0).any()  # the ringing lobes
    padded = circular_lowpass_kernel(math.pi / 2, 11, pad_to=21)
    assert padded.shape == (21, 21) and abs(padded.sum().item() - 1) < 1e-5
    assert torch.equal(padded[5:16, 5:16], circular_lowpass_kernel(math.pi / 2, 11))


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
def test_isotropic_gaussian_measured_sigma(sigma):
    k = bivariate_gaussian(21, sigma, sigma, 0.0, True).double()
    xx, yy = mesh_grid(21)
    assert abs(math.sqrt((k * xx**2).sum().item()) / sigma - 1) < 0.02
    assert abs(math.sqrt((k * yy**2).sum().item()) / sigma - 1) < 0.02


@pytest.mark.parametrize("make", [bivariate_gaussian, bivariate_generalized_gaussian, bivariate_plateau])
def test_anisotropic_rotation_by_quarter_turn_transposes(make):
    extra = () if make is bivariate_gaussian else (1.3,)
    rotated = make(21, 3.0, 1.0, math.pi / 2, *extra, False)
    assert torch.allclose(rotated, make(21, 3.0, 1.0, 0.0, *extra, False).T, atol=1e-6)
    assert torch.allclose(rotated, make(21, 1.0, 3.0, 0.0, *extra, False), atol=1e-6)
    assert not torch.allclose(rotated, rotated.T, atol=1e-4)  # really anisotropic


def test_tiny_sigma_gaussian_is_a_delta():
    for k in (bivariate_gaussian(21, 0.015, 0.015, 0.0, True), bivariate_gaussian(7, 0.015, 0.012, 1.0, False)):
        c = k.shape[0] // 2
        assert k[c, c] > 0.999


@pytest.mark.parametrize("beta", [0.01, 0.015, 0.02])
@pytest.mark.parametrize("make", [bivariate_generalized_gaussian, bivariate_plateau])
def test_tiny_beta_is_a_near_box_blur(make, beta):
    # The `paper` quirk: with beta ~0.01 the kernel is almost flat over its whole window.
    for sigma in PAPER_RANGE + (0.2, 3.0):
        k = make(21, sigma, sigma, 0.0, beta, True)
        assert k[10, 10] / k[0, 0] < 2.5
        assert k[10, 11] / k[0, 0] < 1.1  # off-centre it is flat


def test_random_mixed_kernel_paper_ranges_give_near_box_blurs():
    rng = np.random.default_rng(3)
    for kernel_type in ("generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"):
        for _ in range(5):
            k, p = random_mixed_kernel(rng, [kernel_type], [1.0], 21, PAPER_RANGE, PAPER_RANGE, (-math.pi, math.pi),
                                       PAPER_RANGE, PAPER_RANGE)
            assert p["type"] == kernel_type and PAPER_RANGE[0] <= p["beta"] <= PAPER_RANGE[1]
            assert k[10, 10] / k[0, 0] < 2.5 and abs(k.sum().item() - 1) < 1e-5


def test_random_mixed_kernel_beta_rule_and_params():
    rng = np.random.default_rng(0)
    betas = []
    for _ in range(200):
        _, p = random_mixed_kernel(rng, ["generalized_aniso"], [1.0], 11, (0.5, 2), (0.5, 2), (-1, 1), (0.5, 4), (1, 2))
        assert 0.5 <= p["sigma_x"] <= 2 and 0.5 <= p["sigma_y"] <= 2 and -1 <= p["theta"] <= 1
        betas.append(p["beta"])
    betas = np.array(betas)
    # Half below 1, half above: the rule draws the side first, not beta uniformly over the range.
    assert 0.35 < (betas < 1).mean() < 0.65 and betas.min() >= 0.5 and betas.max() <= 4
    _, p = random_mixed_kernel(rng, ["iso"], [1.0], 11, (0.5, 2), (0.5, 2), (-1, 1), (0.5, 4), (1, 2))
    assert p["sigma_y"] == p["sigma_x"] and p["theta"] == 0.0 and "beta" not in p
    types = {random_mixed_kernel(rng, KERNEL_TYPES, REALESRGAN_CFG["kernel_prob"], 7)[1]["type"] for _ in range(300)}
    assert types == set(KERNEL_TYPES)


def test_sinc_frequency_response():
    cutoff = math.pi / 2
    k = circular_lowpass_kernel(cutoff, 21).double()
    mag = torch.fft.fft2(k, s=(64, 64)).abs()
    f = torch.fft.fftfreq(64, dtype=torch.float64) * 2 * math.pi
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    passband = mag[radius < 0.5 * cutoff]
    stopband = mag[(radius > 1.5 * cutoff) & (radius <= math.pi)]
    # The window is truncated at 21 px, so a little Gibbs ripple remains.
    assert abs(passband.mean().item() - 1) < 0.08 and passband.min() > 0.85 and passband.max() < 1.05
    assert stopband.mean() < 0.02 and stopband.max() < 0.1


@pytest.mark.parametrize("cfg", [REALESRGAN_CFG, SimpleNamespace(**{**REALESRGAN_CFG, "sinc_prob": 0.5})])
def test_sample_blur_kernel_reproducible_and_recorded(cfg):
    seen = set()
    for seed in range(40):
        k, p = sample_blur_kernel(np.random.default_rng(seed), cfg)
        k2, p2 = sample_blur_kernel(np.random.default_rng(seed), cfg)
        assert torch.equal(k, k2) and p == p2
        assert k.shape == (21, 21) and k.dtype == torch.float32 and abs(k.sum().item() - 1) < 1e-5
        assert json.loads(json.dumps(p)) == p
        assert p["kernel_size"] in range(7, 22, 2)
        if p["type"] == "sinc":
            low = math.pi / 3 if p["kernel_size"] < 13 else math.pi / 5
            assert low <= p["omega_c"] <= math.pi
        else:
            assert 0.2 <= p["sigma_x"] <= 3.0
        seen.add(p["type"])
    assert "iso" in seen and len(seen) >= 3
    sinc_only = {**REALESRGAN_CFG, "sinc_prob": 1.0}
    assert sample_blur_kernel(np.random.default_rng(1), sinc_only)[1]["type"] == "sinc"


def test_sample_final_sinc():
    k, p = sample_final_sinc(np.random.default_rng(0), 0.0)
    assert p == {"type": "pulse"} and k.shape == (21, 21) and k[10, 10] == 1 and k.sum() == 1
    for seed in range(10):
        k, p = sample_final_sinc(np.random.default_rng(seed), 1.0)
        k2, p2 = sample_final_sinc(np.random.default_rng(seed), 1.0)
        assert torch.equal(k, k2) and p == p2 and json.loads(json.dumps(p)) == p
        assert p["type"] == "sinc" and math.pi / 3 <= p["omega_c"] <= math.pi
        assert k.shape == (21, 21) and abs(k.sum().item() - 1) < 1e-5


# ---------------------------------------------------------------- ops


def test_filter2d_identity_pulse_is_exact():
    x = torch.rand(2, 3, 40, 33, generator=torch.Generator().manual_seed(0))
    pulse = sample_final_sinc(np.random.default_rng(0), 0.0)[0]
    assert torch.equal(filter2d(x, pulse), x)
    assert torch.equal(filter2d(x, torch.stack([pulse, pulse])), x)


def test_filter2d_per_sample_kernels_match_single_image_conv():
    x = torch.rand(3, 3, 32, 36, generator=torch.Generator().manual_seed(1))
    kernels = torch.stack([sample_blur_kernel(np.random.default_rng(s), REALESRGAN_CFG)[0] for s in range(3)])
    out = filter2d(x, kernels)
    assert out.shape == x.shape
    for i in range(3):
        padded = F.pad(x[i : i + 1], (10, 10, 10, 10), mode="reflect")
        ref = F.conv2d(padded, kernels[i].expand(3, 1, 21, 21), groups=3)
        assert torch.allclose(out[i : i + 1], ref, atol=1e-6)
    assert not torch.allclose(out[0], filter2d(x[:1], kernels[1])[0], atol=1e-4)


@pytest.mark.parametrize("mode", ["area", "bilinear", "bicubic"])
def test_resize_shapes(mode):
    x = torch.rand(2, 3, 64, 48)
    assert resize(x, size=(16, 12), mode=mode).shape == (2, 3, 16, 12)
    assert resize(x, scale=0.5, mode=mode).shape == (2, 3, 32, 24)
    assert resize(x, scale=1.5, mode=mode).shape == (2, 3, 96, 72)
    with pytest.raises(ValueError):
        resize(x, size=(16, 12), scale=0.5, mode=mode)


def test_gaussian_noise_std_and_gray():
    x = torch.full((2, 3, 256, 256), 0.5)
    sigma = torch.tensor([0.05, 0.1])
    out = gaussian_noise(x, sigma, torch.tensor([False, True]), torch.Generator().manual_seed(0))
    noise = out - x
    for i in range(2):
        assert abs(noise[i].std().item() / sigma[i].item() - 1) < 0.02
    assert not torch.allclose(noise[0, 0], noise[0, 1])
    assert torch.equal(noise[1, 0], noise[1, 1]) and torch.equal(noise[1, 0], noise[1, 2])
    again = gaussian_noise(x, sigma, torch.tensor([False, True]), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_poisson_noise_zero_mean_scales_and_gray():
    x = _texture(0, 128).expand(1, 3, 128, 128) * torch.tensor([1.0, 0.8, 0.6]).reshape(1, 3, 1, 1)
    small = poisson_noise(x, torch.tensor([1.0]), torch.tensor([False]), torch.Generator().manual_seed(0)) - x
    large = poisson_noise(x, torch.tensor([3.0]), torch.tensor([False]), torch.Generator().manual_seed(1)) - x
    assert small.std() > 0.01
    # Zero-mean up to the 8-bit quantisation offset (noise is measured from the quantised image).
    assert abs(small.mean().item()) < 0.05 * small.std().item()
    assert large.std() > 2 * small.std()
    gray = poisson_noise(x, 1.0, True, torch.Generator().manual_seed(2)) - x
    # Same noise on every channel (up to float rounding of (x + noise) - x).
    assert gray.std() > 0.01
    assert torch.allclose(gray[0, 0], gray[0, 1], atol=1e-6) and torch.allclose(gray[0, 0], gray[0, 2], atol=1e-6)
    flat = torch.zeros(1, 3, 16, 16)
    assert torch.equal(poisson_noise(flat, 2.0, False, torch.Generator().manual_seed(0)), flat)


def test_jpeg_error_decreases_with_quality():
    t = _texture(0, 128)
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    x = torch.cat([t, 0.5 * t + 0.25 * (1 + torch.sin(xx / 5)), 0.8 * t + 0.1 * (1 + torch.cos(yy / 7))], 1)
    errors = [(jpeg(x, q) - x).abs().mean().item() for q in (10, 30, 50, 70, 90)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    batch = jpeg(torch.cat([x, x]), [10, 90])
    assert batch.shape == (2, 3, 128, 128) and batch.dtype == x.dtype
    assert torch.equal(batch[1:], jpeg(x, 90))
    # q=100 is near-lossless (on grey content: 4:2:0 chroma subsampling is the only loss left on colour).
    grey = t.expand(1, 3, 128, 128)
    assert (jpeg(grey, 100) - grey).abs().mean() < 1 / 255
    assert (jpeg(t, 100) - t).abs().max() < 3 / 255  # single channel goes through as 'L'


def test_usm_sharpen_edges_and_flat():
    x = torch.zeros(1, 3, 96, 96)
    x[..., 48:] = 0.8
    x = filter2d(x, bivariate_gaussian(9, 2.0, 2.0, 0.0))  # a soft edge, so sharpening has room
    out = usm_sharpen(x)

    def hf_energy(img):
        return ((img[..., :, 1:] - img[..., :, :-1]) ** 2).sum() + ((img[..., 1:, :] - img[..., :-1, :]) ** 2).sum()

    assert hf_energy(out) > 1.05 * hf_energy(x)
    assert out.min() >= 0 and out.max() <= 1
    flat = torch.full((2, 3, 64, 64), 0.4)
    assert torch.equal(usm_sharpen(flat), flat)


def test_usm_blur_kernel_follows_opencv_sigma_rule():
    from srmodel.degrade.ops import gaussian_kernel_1d

    g = gaussian_kernel_1d(51)  # BasicSR's USMSharp default (radius 50 -> size 51): sigma 0.3*(25-1)+0.8 = 8
    ax = torch.arange(51, dtype=torch.float64) - 25
    assert abs(math.sqrt((g * ax**2).sum().item()) / 8.0 - 1) < 0.01
    assert gaussian_kernel_1d(5).tolist() == [0.0625, 0.25, 0.375, 0.25, 0.0625]
