import pytest
import torch

from srmodel.imaging.colorfix import (
    adain_color_fix,
    color_fix,
    wavelet_color_fix,
    wavelet_decompose,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _chan_stats(x):
    flat = x.double().flatten(2)
    return flat.mean(2), flat.std(2)  # unbiased, like torch .var default


def _ramp_field(h, w, base, gx, gy):
    """Linear colour ramp (B=1, 3, h, w): preserved exactly by a symmetric blur."""
    ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    base = torch.tensor(base).view(1, 3, 1, 1)
    gx = torch.tensor(gx).view(1, 3, 1, 1)
    gy = torch.tensor(gy).view(1, 3, 1, 1)
    return base + gx * xs + gy * ys


def _checkerboard(h, w, amp):
    ys = torch.arange(h).view(h, 1)
    xs = torch.arange(w).view(1, w)
    cb = ((ys + xs) % 2).float() * 2 - 1  # +-1, period 2 pixels
    return (amp * cb).expand(1, 3, h, w)


# ---------------------------------------------------------------- AdaIN


def test_adain_matches_source_stats():
    g = _gen(1)
    # Non-saturating: target uniform normalises to about +-1.73 sigma; source
    # std ~0.087 around 0.3..0.6, so the output stays inside [0, 1].
    target = 0.2 + 0.6 * torch.rand(2, 3, 40, 56, generator=g)
    means = torch.tensor([0.3, 0.5, 0.6]).view(1, 3, 1, 1)
    source = means + 0.3 * (torch.rand(2, 3, 40, 56, generator=g) - 0.5)
    out = adain_color_fix(target, source)
    assert out.shape == target.shape and out.dtype == target.dtype
    assert 0.0 < out.min() and out.max() < 1.0  # the clamp did not bite
    o_mean, o_std = _chan_stats(out)
    s_mean, s_std = _chan_stats(source)
    torch.testing.assert_close(o_mean, s_mean, atol=1e-5, rtol=0)
    # eps=1e-5 in the variance shifts std by ~eps/(2 var) ~ 7e-4 relative.
    torch.testing.assert_close(o_std, s_std, atol=0, rtol=2e-3)


def test_adain_matches_reference_formula():
    g = _gen(2)
    target = 0.3 + 0.4 * torch.rand(1, 3, 9, 11, generator=g)
    source = 0.4 + 0.2 * torch.rand(1, 3, 9, 11, generator=g)
    eps = 1e-5

    # SeeSR's calc_mean_std / adaptive_instance_normalization, written out.
    def calc_mean_std(feat):
        b, c = feat.shape[:2]
        std = (feat.view(b, c, -1).var(dim=2) + eps).sqrt().view(b, c, 1, 1)
        mean = feat.view(b, c, -1).mean(dim=2).view(b, c, 1, 1)
        return mean, std

    t_mean, t_std = calc_mean_std(target)
    s_mean, s_std = calc_mean_std(source)
    expected = ((target - t_mean) / t_std * s_std + s_mean).clamp(0, 1)
    torch.testing.assert_close(adain_color_fix(target, source, eps=eps), expected)


def test_adain_identity_when_source_is_target():
    g = _gen(3)
    x = torch.rand(3, 3, 37, 53, generator=g)
    torch.testing.assert_close(adain_color_fix(x, x), x, atol=1e-6, rtol=0)


def test_adain_per_image_in_batch():
    g = _gen(4)
    target = 0.2 + 0.6 * torch.rand(2, 3, 16, 16, generator=g)
    source = 0.4 + 0.2 * torch.rand(2, 3, 16, 16, generator=g)
    source[1] = 0.2 + 0.1 * torch.rand(3, 16, 16, generator=g)
    out = adain_color_fix(target, source)
    for i in range(2):
        torch.testing.assert_close(out[i : i + 1], adain_color_fix(target[i : i + 1], source[i : i + 1]))


# ---------------------------------------------------------------- wavelet


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 37, 53), (1, 3, 1, 1), (1, 3, 5, 2)])
def test_wavelet_decompose_sums_to_input(shape):
    x = torch.rand(*shape, generator=_gen(5))
    high, low = wavelet_decompose(x, levels=5)
    assert high.shape == low.shape == x.shape
    torch.testing.assert_close(high + low, x, atol=1e-6, rtol=0)


def test_wavelet_low_is_smooth():
    x = torch.rand(1, 3, 64, 64, generator=_gen(6))
    high, low = wavelet_decompose(x, levels=5)
    # The residual after 5 blurs has far less variation than white noise.
    assert low.std() < 0.2 * x.std()
    assert high.abs().mean() > low.sub(low.mean()).abs().mean()


def test_wavelet_fix_keeps_target_high_and_source_low():
    h, w = 96, 112
    a = _ramp_field(h, w, [0.35, 0.45, 0.40], [0.001, -0.0005, 0.0], [0.0, 0.001, -0.0008])
    b = _ramp_field(h, w, [0.55, 0.30, 0.50], [-0.001, 0.0, 0.0012], [0.0008, 0.0005, 0.0])
    cb = _checkerboard(h, w, 0.1)
    target = a + cb
    source = b
    out = wavelet_color_fix(target, source)
    assert out.shape == target.shape
    # Replicate padding only disturbs the linear ramps within the total blur
    # reach (1+2+4+8+16 = 31 px) of the border.
    m = 32
    torch.testing.assert_close(
        out[..., m:-m, m:-m], (b + cb)[..., m:-m, m:-m], atol=1e-5, rtol=0
    )
    # And globally: source colour, target texture.
    assert (out.mean((2, 3)) - b.mean((2, 3))).abs().max() < 0.01
    assert (out - b).abs().mean() > 0.09  # checkerboard survived


def test_wavelet_fix_batch_and_odd_size():
    g = _gen(7)
    target = torch.rand(3, 3, 37, 53, generator=g)
    source = torch.rand(3, 3, 37, 53, generator=g)
    out = wavelet_color_fix(target, source)
    assert out.shape == (3, 3, 37, 53)
    assert out.min() >= 0 and out.max() <= 1
    # Batch items are independent.
    torch.testing.assert_close(out[1:2], wavelet_color_fix(target[1:2], source[1:2]))


def test_wavelet_fix_identity_when_source_is_target():
    x = torch.rand(2, 3, 37, 53, generator=_gen(8))
    torch.testing.assert_close(wavelet_color_fix(x, x), x, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- dispatch


def test_color_fix_dispatch():
    g = _gen(9)
    target = 0.2 + 0.6 * torch.rand(1, 3, 20, 24, generator=g)
    source = 0.3 + 0.3 * torch.rand(1, 3, 20, 24, generator=g)
    assert color_fix(target, source, "none") is target
    torch.testing.assert_close(color_fix(target, source, "adain"), adain_color_fix(target, source))
    torch.testing.assert_close(
        color_fix(target, source, "wavelet"), wavelet_color_fix(target, source)
    )


@pytest.mark.parametrize("method", ["AdaIN", "", "histogram", None])
def test_color_fix_bad_method(method):
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError) as exc:
        color_fix(x, x, method)
    msg = str(exc.value)
    for allowed in ("adain", "wavelet", "none"):
        assert allowed in msg


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        adain_color_fix(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match="shape"):
        wavelet_color_fix(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["adain", "wavelet", "none"])
def test_half_precision_inputs(dtype, method):
    g = _gen(10)
    target32 = 0.2 + 0.6 * torch.rand(2, 3, 37, 53, generator=g)
    source32 = 0.3 + 0.4 * torch.rand(2, 3, 37, 53, generator=g)
    out = color_fix(target32.to(dtype), source32.to(dtype), method)
    assert out.dtype == dtype
    assert out.shape == target32.shape
    assert torch.isfinite(out.float()).all()
    # Close to the float32 result up to the input/output rounding.
    ref = color_fix(target32.to(dtype).float(), source32.to(dtype).float(), method)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=0)
