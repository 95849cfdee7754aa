"""The UGC LR degradations (srmodel.degrade.ugc): each op's effect, apply_ugc's sampling, the `ugc` preset."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from srmodel.degrade import PRESETS, get_degrade_preset
from srmodel.degrade.config import UGCConfig
from srmodel.degrade.ugc import (
    apply_ugc,
    brightness_contrast,
    chroma_subsample,
    overlay_text,
    oversharpen,
    rescale_chain,
    video_codec,
)

ALL_OPS = ["brightness_contrast", "oversharpen", "overlay_text", "rescale_chain", "chroma_subsample", "video_codec"]
PROBS = ["video_codec_prob", "chroma_prob", "rescale_chain_prob", "oversharpen_prob", "overlay_text_prob",
         "brightness_contrast_prob"]


def textured(n=1, h=48, w=64, seed=0, lo=0.0, hi=1.0):
    """Smooth colour blobs plus fine texture, in [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bilinear",
                           align_corners=False)
    fine = torch.rand(n, 3, h, w, generator=g)
    return lo + (hi - lo) * (0.6 * coarse + 0.4 * fine)


def hf_energy(x):
    """Mean squared horizontal + vertical pixel differences."""
    return float((x[..., 1:] - x[..., :-1]).pow(2).mean() + (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean())


def ypbpr(x):
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return y, (b - y) / 1.772, (r - y) / 1.402


def all_on(**kw):
    return UGCConfig(**{k: 1.0 for k in PROBS}, **kw)


# ----------------------------------------------------------------------------- video_codec


def test_video_codec_real_round_trip_and_crf():
    x = textured()
    lo, hi = video_codec(x, 18), video_codec(x, 40)
    assert lo.shape == x.shape and lo.dtype == x.dtype
    assert not torch.equal(lo, x) and float(lo.min()) >= 0 and float(lo.max()) <= 1
    assert (hi - x).abs().mean() > (lo - x).abs().mean()
    # Per-pixel colour noise is lost to 4:2:0 at any crf, so compare luma, where the crf acts.
    err18, err40 = ((ypbpr(o)[0] - ypbpr(x)[0]).abs().mean() for o in (lo, hi))
    assert err40 > 3 * err18, (err18, err40)
    assert float((ypbpr(video_codec(x, 0))[0] - ypbpr(x)[0]).abs().max()) < 0.01  # lossless-ish: conversions right
    assert hf_energy(hi) < hf_energy(x)  # heavy quantisation flattens the texture
    assert torch.equal(video_codec(x, 30, "veryfast"), video_codec(x, 30, "veryfast"))  # deterministic


def test_video_codec_odd_sizes():
    x = textured(2, 29, 37, seed=1)
    out = video_codec(x, 30, "ultrafast")
    assert out.shape == (2, 3, 29, 37)
    assert (out - x).abs().mean() < 0.2  # still the same picture, only degraded
    assert video_codec(torch.rand(1, 3, 1, 3), 23).shape == (1, 3, 1, 3)


# ----------------------------------------------------------------------------- chroma_subsample


def test_chroma_subsample_keeps_luma_and_smears_colour():
    x = textured(lo=0.2, hi=0.8)  # away from the clamp
    for factor in (2, 4):
        out = chroma_subsample(x, factor)
        assert out.shape == x.shape
        (y0, pb0, pr0), (y1, pb1, pr1) = ypbpr(x), ypbpr(out)
        assert float((y1 - y0).abs().max()) < 1e-3
        assert hf_energy(torch.cat([pb1, pr1], 1)) < 0.5 * hf_energy(torch.cat([pb0, pr0], 1))
    assert hf_energy(chroma_subsample(x, 4)) < hf_energy(chroma_subsample(x, 2))


# ----------------------------------------------------------------------------- rescale_chain


def test_rescale_chain_preserves_size_and_blurs():
    x = textured(h=48, w=64)
    steps = [{"scale": 0.6, "down": "area", "up": "bilinear"}, {"scale": 0.8, "down": "bicubic", "up": "bicubic"},
             {"scale": 0.5, "down": "bilinear", "up": "area"}]
    out = rescale_chain(x, steps)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert hf_energy(out) < 0.6 * hf_energy(x)
    assert torch.equal(rescale_chain(x, []), x)
    assert rescale_chain(textured(h=29, w=37), steps[:2]).shape == (1, 3, 29, 37)


# ----------------------------------------------------------------------------- oversharpen


def test_oversharpen_boosts_detail_and_overshoots_edges():
    x = textured(lo=0.3, hi=0.7)
    assert hf_energy(oversharpen(x, 2.0, 1.0)) > 1.5 * hf_energy(x)
    step = torch.full((1, 3, 32, 32), 0.3)
    step[..., 16:] = 0.7
    out = oversharpen(step, 2.0, 1.5)
    assert float(out[..., 16:].max()) > 0.75 and float(out[..., :16].min()) < 0.25  # halos on both sides
    assert torch.allclose(out[..., :4], step[..., :4]) and torch.allclose(out[..., -4:], step[..., -4:])
    assert float(oversharpen(step, 3.0, 2.0).max()) <= 1


# ----------------------------------------------------------------------------- overlay_text


@pytest.mark.parametrize("style", ["outline", "shadow", "none"])
def test_overlay_text_is_local(style):
    x = textured(2)
    left, top, size = 6, 10, 12
    out = overlay_text(x, "Ab3", (left, top), size, (255, 255, 255), 1.0, style)
    assert out.shape == x.shape
    changed = (out != x).any(1)  # (B, H, W)
    assert torch.equal(changed[0], changed[1])  # same overlay on every image
    rows, cols = changed[0].nonzero(as_tuple=True)
    assert rows.numel() > 20
    m = 3  # outline/shadow margin
    assert int(rows.min()) >= top - m and int(rows.max()) < top + size + m
    assert int(cols.min()) >= left - m and int(cols.max()) < left + 3 * size + m
    assert changed[0].float().mean() < 0.25


def test_overlay_text_clips_and_opacity():
    x = textured()
    out = overlay_text(x, "watermark", (50, 40), 16, (0, 0, 0), 0.5, "outline")  # runs off the right/bottom
    assert out.shape == x.shape and (out != x).any()
    assert torch.equal(overlay_text(x, "abc", (200, 200), 10, (255, 0, 0)), x)  # entirely off the image
    faint, solid = (overlay_text(x, "HI", (4, 4), 14, (255, 255, 255), op, "none") for op in (0.3, 1.0))
    assert (faint - x).abs().sum() < (solid - x).abs().sum()


# ----------------------------------------------------------------------------- brightness_contrast


def test_brightness_contrast_identity_and_monotone():
    x = textured()
    assert torch.equal(brightness_contrast(x, 0.0, 1.0, 1.0), x)
    outs = [brightness_contrast(x, b, 1.1, 0.9) for b in (-0.1, -0.05, 0.0, 0.05, 0.1)]
    for a, b in zip(outs, outs[1:]):
        assert bool((b >= a).all()) and float(b.mean()) > float(a.mean())
    assert float(brightness_contrast(x, 0.0, 1.0, 1.25).mean()) < float(x.mean())  # gamma > 1 darkens
    hi = brightness_contrast(x, 0.1, 1.2, 0.8)
    assert float(hi.min()) >= 0 and float(hi.max()) <= 1


# ----------------------------------------------------------------------------- apply_ugc


def test_apply_ugc_deterministic_and_recorded():
    x = textured(3, 48, 64)
    out, params = apply_ugc(x, np.random.default_rng(5), all_on())
    out2, params2 = apply_ugc(x, np.random.default_rng(5), all_on())
    assert torch.equal(out, out2) and params == params2
    assert out.shape == x.shape and out.dtype == x.dtype and float(out.min()) >= 0 and float(out.max()) <= 1
    assert json.loads(json.dumps(params)) == params  # plain JSON
    for p in params:
        assert p["ops"] == ALL_OPS and p["lr_only_overlay"] is True
        assert all(isinstance(p[op], dict) and p[op] for op in ALL_OPS)
        assert 23 <= p["video_codec"]["crf"] <= 40 and 2 <= len(p["rescale_chain"]["steps"]) <= 3
    assert len({json.dumps(p) for p in params}) == 3  # drawn per image
    out3, _ = apply_ugc(x, np.random.default_rng(6), all_on())
    assert not torch.equal(out, out3)


def test_apply_ugc_default_probabilities_record_every_applied_op():
    x = textured(4, 29, 37)
    seen = set()
    for seed in range(6):
        out, params = apply_ugc(x, np.random.default_rng(seed), UGCConfig())
        assert out.shape == x.shape
        for i, p in enumerate(params):
            assert set(p) == {"ops", "lr_only_overlay", *p["ops"]}
            assert p["ops"] == [op for op in ALL_OPS if op in p["ops"]]  # fixed order
            assert p["lr_only_overlay"] == ("overlay_text" in p["ops"])
            if not p["ops"]:
                assert torch.equal(out[i], x[i])
            seen.update(p["ops"])
        json.dumps(params)
    assert {"video_codec", "chroma_subsample", "rescale_chain", "brightness_contrast"} <= seen


def test_apply_ugc_all_zero_is_identity():
    x = textured(2)
    out, params = apply_ugc(x, np.random.default_rng(0), UGCConfig(**{k: 0.0 for k in PROBS}))
    assert torch.equal(out, x)
    assert params == [{"ops": [], "lr_only_overlay": False}] * 2


# ----------------------------------------------------------------------------- config and preset


def test_ugc_config_and_preset():
    assert PRESETS["ugc"].ugc is not None and get_degrade_preset("ugc") is PRESETS["ugc"]
    assert PRESETS["ugc"].ugc == UGCConfig()
    assert PRESETS["realesrgan"].ugc is None and PRESETS["paper"].ugc is None
    ugc, real = PRESETS["ugc"].model_dump(), PRESETS["realesrgan"].model_dump()
    assert {k: v for k, v in ugc.items() if k not in ("name", "ugc")} == {
        k: v for k, v in real.items() if k not in ("name", "ugc")}
    d = UGCConfig()
    assert (d.video_codec_prob, d.chroma_prob, d.rescale_chain_prob, d.oversharpen_prob, d.overlay_text_prob,
            d.brightness_contrast_prob) == (0.5, 0.3, 0.3, 0.2, 0.1, 0.3)
    assert d.crf_range == (23, 40)
    with pytest.raises(ValidationError):
        UGCConfig(bogus=1)
    with pytest.raises(ValidationError):
        UGCConfig(video_codec_prob=1.5)
    with pytest.raises(ValidationError):
        d.chroma_prob = 0.5  # frozen
