"""The challenge's PSNR/SSIM (Y, crop 4, Gaussian 11x11): closed forms and scikit-image; LPIPS and pyiqa wiring."""

import math
import sys

import numpy as np
import pytest
import torch
import torchvision
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from srmodel.metrics.learned import ALEXNET_FILE, LPIPSAlex, NoReference
from srmodel.metrics.challenge import C1, challenge_score, gaussian_kernel, psnr_y, rgb_to_y, ssim_y

RNG = np.random.default_rng(12)


def grey(h, w, value):
    return np.full((h, w, 3), value, np.uint8)


def noisy_pair(h, w, spread=25):
    gt = RNG.integers(0, 256, (h, w, 3)).astype(np.uint8)
    sr = np.clip(gt.astype(int) + RNG.integers(-spread, spread + 1, gt.shape), 0, 255).astype(np.uint8)
    return sr, gt


def test_y_is_bt601_studio_range():
    assert rgb_to_y(grey(1, 1, 255))[0, 0] == pytest.approx(235.0, abs=1e-12)
    assert rgb_to_y(grey(1, 1, 0))[0, 0] == pytest.approx(16.0, abs=1e-12)
    red = np.array([[[255, 0, 0]]], np.uint8)
    assert rgb_to_y(red)[0, 0] == pytest.approx(16 + 65.481, abs=1e-12)
    assert rgb_to_y(red).dtype == np.float64


@pytest.mark.parametrize("d", [1, 7, 40])
def test_psnr_of_a_uniform_shift_is_closed_form(d):
    # Every pixel moves by d in R, G and B: Y moves by d * 219/255 everywhere.
    expected = 10 * math.log10(255.0**2 / (d * 219.0 / 255.0) ** 2)
    assert psnr_y(grey(20, 30, 100 + d), grey(20, 30, 100)) == pytest.approx(expected, abs=1e-9)


def test_ssim_of_flat_images_is_closed_form():
    a, b = rgb_to_y(grey(1, 1, 180))[0, 0], rgb_to_y(grey(1, 1, 60))[0, 0]
    expected = (2 * a * b + C1) / (a * a + b * b + C1)  # zero variance: the structure term is C2/C2 = 1
    assert ssim_y(grey(24, 24, 180), grey(24, 24, 60)) == pytest.approx(expected, abs=1e-12)


def test_identical_images_and_crop_border():
    sr, gt = noisy_pair(40, 36)
    assert psnr_y(gt, gt) == math.inf and ssim_y(gt, gt) == pytest.approx(1.0, abs=1e-12)
    # Differences only in the 4-pixel border are cut away by crop_border=4, and counted with 0.
    framed = gt.copy()
    framed[:4] = 0
    framed[:, -4:] = 255
    assert psnr_y(framed, gt) == math.inf and ssim_y(framed, gt) == pytest.approx(1.0, abs=1e-12)
    assert psnr_y(framed, gt, crop_border=0) < 20 and ssim_y(framed, gt, crop_border=0) < 0.99


def test_gaussian_window():
    k = gaussian_kernel()
    assert k.shape == (11,) and k.sum() == pytest.approx(1.0, abs=1e-15)
    assert k[5] / k[4] == pytest.approx(math.exp(1 / (2 * 1.5**2)), rel=1e-12)


@pytest.mark.parametrize("shape", [(64, 64), (67, 53), (31, 120)])
def test_against_scikit_image(shape):
    worst = 0.0
    for spread in (3, 25, 120):
        sr, gt = noisy_pair(*shape, spread)
        ys, yg = rgb_to_y(sr)[4:-4, 4:-4], rgb_to_y(gt)[4:-4, 4:-4]
        ref_psnr = peak_signal_noise_ratio(yg, ys, data_range=255)
        ref_ssim = structural_similarity(ys, yg, win_size=11, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=255)
        worst = max(worst, abs(psnr_y(sr, gt) - ref_psnr), abs(ssim_y(sr, gt) - ref_ssim))
    assert worst < 1e-6, worst


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="differ in size"):
        psnr_y(grey(20, 20, 0), grey(20, 24, 0))
    with pytest.raises(ValueError, match="too small for SSIM"):
        ssim_y(grey(16, 40, 0), grey(16, 40, 0))


def test_score_needs_every_term():
    means = {"psnr": 25.0, "ssim": 0.7, "lpips": 0.3, "musiq": 60.0, "maniqa": 0.5, "clipiqa": 0.6}
    assert challenge_score(means) == pytest.approx(25 + 7 - 3 + 6 + 5 + 6)
    assert challenge_score({**means, "musiq": None}) is None


def test_lpips_without_weights_says_where_they_go(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match=ALEXNET_FILE):
        LPIPSAlex()


def test_lpips_with_local_alexnet_weights(tmp_path, monkeypatch):
    # Random AlexNet weights at the torch hub path: checks the wiring only (no download is possible here);
    # LPIPS of an image with itself is 0 whatever the weights.
    (tmp_path / "checkpoints").mkdir()
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / "checkpoints" / ALEXNET_FILE)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    metric = LPIPSAlex()
    sr, gt = noisy_pair(48, 40)
    assert metric(gt, gt) == pytest.approx(0.0, abs=1e-7)
    value = metric(sr, gt)
    assert math.isfinite(value) and value > 0


def test_no_reference_metrics_without_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # as if the optional extra were not installed
    nr = NoReference(["musiq", "maniqa", "clipiqa"])
    assert nr.metrics == {} and set(nr.unavailable) == {"musiq", "maniqa", "clipiqa"}
    assert all("pyiqa" in why and "non-commercial" in why for why in nr.unavailable.values())
    assert nr(np.zeros((8, 8, 3), np.uint8)) == {}
