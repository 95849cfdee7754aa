import dataclasses

import pytest
import torch
import torch.nn.functional as F

from srmodel.imaging.sizes import (
    SizePlan,
    crop_to,
    finish_output,
    pad_to,
    plan_size,
    prepare_condition,
    resize_image,
)


def _rand(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- plan_size


def test_plan_333x517_x1():
    p = plan_size(333, 517, 1, process_size=512)
    # Short side 333 < 512//1 -> short side becomes 512; the other side is
    # int(517 * 512 / 333) = int(264704 / 333) = int(794.906...) = 794.
    assert p.work_size == (512, 794)
    # 794 -> next multiple of 8 is 800.
    assert p.padded_size == (512, 800)
    assert p.pad == (0, 6)
    assert p.out_size == (333, 517)
    assert p.src_size == (333, 517) and p.scale == 1


def test_plan_517x333_x1_landscape():
    p = plan_size(517, 333, 1)
    assert p.work_size == (794, 512)
    assert p.padded_size == (800, 512)


def test_plan_333x517_x4():
    p = plan_size(333, 517, 4, process_size=512)
    # 512//4 = 128 and both sides >= 128: no rescale, just x4.
    assert p.work_size == (1332, 2068)
    # 1332 = 8*166.5 -> 1336; 2068 = 8*258.5 -> 2072.
    assert p.padded_size == (1336, 2072)
    assert p.pad == (4, 4)
    assert p.out_size == (1332, 2068)


def test_plan_small_inputs_hand_values():
    # 7x5 at x4: short side 5 < 128 -> (int(7*128/5), 128) = (179, 128); x4.
    assert plan_size(7, 5, 4).work_size == (716, 512)
    # 1x1 at x1: square, both sides become 512.
    assert plan_size(1, 1, 1).work_size == (512, 512)
    # 1000x17 at x4: (int(1000*128/17), 128) = (7529, 128); x4.
    assert plan_size(1000, 17, 4).work_size == (30116, 512)


def test_large_inputs_never_downscaled():
    p = plan_size(2000, 1500, 1)
    assert p.work_size == (2000, 1500)
    assert p.padded_size == (2000, 1504)
    assert p.out_size == (2000, 1500)
    # Exactly at the threshold: no rescale either.
    assert plan_size(512, 600, 1).work_size == (512, 600)
    assert plan_size(128, 900, 4).work_size == (512, 3600)


def test_process_size_zero_disables_rescale():
    p = plan_size(7, 5, 2, process_size=0)
    assert p.work_size == (14, 10)
    assert p.padded_size == (16, 16)


@pytest.mark.parametrize(
    "w,h,s",
    [(333, 517, 1), (333, 517, 4), (7, 5, 4), (1, 1, 1), (1000, 17, 4), (2000, 1500, 1),
     (513, 511, 2), (64, 64, 8), (9, 1000, 3)],
)
@pytest.mark.parametrize("multiple", [1, 8, 64])
def test_padded_size_invariants(w, h, s, multiple):
    p = plan_size(w, h, s, multiple=multiple)
    for work, padded in zip(p.work_size, p.padded_size):
        assert padded % multiple == 0
        assert work <= padded < work + multiple
    assert p.pad == (p.padded_size[0] - p.work_size[0], p.padded_size[1] - p.work_size[1])
    assert p.out_size == (w * s, h * s)
    # Work size is never smaller than the plain x s size (no downscaling).
    assert p.work_size[0] >= w * s and p.work_size[1] >= h * s


def test_sizeplan_is_frozen():
    p = plan_size(10, 10, 1)
    assert isinstance(p, SizePlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.scale = 2


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(width=0, height=5, scale=1), "width"),
        (dict(width=5, height=-3, scale=1), "height"),
        (dict(width=5, height=5, scale=0), "scale"),
        (dict(width=5, height=5, scale=1.5), "scale"),
        (dict(width=5, height=5, scale=True), "scale"),
        (dict(width=5.0, height=5, scale=1), "width"),
        (dict(width=5, height=5, scale=1, process_size=-1), "process_size"),
        (dict(width=5, height=5, scale=1, multiple=0), "multiple"),
    ],
)
def test_plan_size_invalid_args(kwargs, name):
    with pytest.raises(ValueError) as exc:
        plan_size(**kwargs)
    msg = str(exc.value)
    assert name in msg
    assert repr(kwargs[name]) in msg


# ---------------------------------------------------------------- resize


def test_resize_same_size_is_noop():
    x = _rand(1, 10, 12)
    assert resize_image(x, (12, 10)) is x


def test_resize_shapes_and_dtype():
    x = _rand(2, 10, 12)
    assert resize_image(x, (30, 7)).shape == (2, 3, 7, 30)
    xh = x.to(torch.bfloat16)
    out = resize_image(xh, (5, 20))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 20, 5)
    assert resize_image(x, (24, 20), mode="nearest").shape == (2, 3, 20, 24)


def test_resize_antialias_when_shrinking():
    # A 1-px checkerboard shrunk 4x should average to grey, not alias.
    cb = ((torch.arange(64).view(64, 1) + torch.arange(64).view(1, 64)) % 2).float()
    x = cb.expand(1, 3, 64, 64).contiguous()
    out = resize_image(x, (16, 16))
    expected = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(out, expected)
    assert (out[..., 2:-2, 2:-2] - 0.5).abs().max() < 0.05


def test_resize_upscale_matches_plain_bicubic():
    x = _rand(1, 9, 7)
    out = resize_image(x, (21, 27))
    expected = F.interpolate(x, size=(27, 21), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- pad / crop


@pytest.mark.parametrize("h,w,hp,wp", [(37, 53, 40, 56), (794, 512, 800, 512), (5, 5, 5, 5), (3, 2, 8, 8)])
def test_pad_crop_roundtrip_exact(h, w, hp, wp):
    x = _rand(2, h, w)
    padded = pad_to(x, (wp, hp))
    assert padded.shape == (2, 3, hp, wp)
    assert torch.equal(padded[..., :h, :w], x)
    assert torch.equal(crop_to(padded, (w, h)), x)


def test_pad_uses_reflect_for_normal_images():
    x = _rand(1, 10, 10)
    padded = pad_to(x, (13, 12))
    # Reflect: first padded column mirrors column w-2 (the edge is not repeated).
    assert torch.equal(padded[..., :10, 10], x[..., :, 8])
    assert torch.equal(padded[..., :10, 12], x[..., :, 6])
    assert torch.equal(padded[..., 11, :10], x[..., 7, :])


def test_pad_falls_back_to_replicate_for_tiny_images():
    x = _rand(1, 3, 2)
    # Pads 6 (right, >= width 2) and 5 (bottom, >= height 3): reflect would fail.
    padded = pad_to(x, (8, 8))
    expected = F.pad(x, (0, 6, 0, 5), mode="replicate")
    assert torch.equal(padded, expected)
    # 1x1 image -> constant.
    one = _rand(1, 1, 1)
    assert torch.equal(pad_to(one, (8, 8)), one.expand(1, 3, 8, 8))


def test_pad_replicate_when_only_one_side_is_too_small():
    x = _rand(1, 20, 3)  # width 3, pad right 5 >= 3; bottom pad 4 < 20
    padded = pad_to(x, (8, 24))
    assert torch.equal(padded, F.pad(x, (0, 5, 0, 4), mode="replicate"))


def test_pad_crop_invalid_sizes():
    x = _rand(1, 10, 10)
    with pytest.raises(ValueError):
        pad_to(x, (9, 12))
    with pytest.raises(ValueError):
        crop_to(x, (11, 10))


# ---------------------------------------------------------------- pipeline


@pytest.mark.parametrize(
    "w,h,s",
    [(7, 5, 1), (7, 5, 4), (1, 1, 1), (1, 1, 4), (1000, 17, 1), (1000, 17, 4), (333, 517, 1),
     (333, 517, 4), (64, 48, 2)],
)
def test_prepare_and_finish_output_sizes(w, h, s):
    plan = plan_size(w, h, s)
    images = _rand(2, h, w, seed=w + h + s)
    cond, work = prepare_condition(images, plan)
    wp, hp = plan.padded_size
    w1, h1 = plan.work_size
    assert cond.shape == (2, 3, hp, wp)
    assert work.shape == (2, 3, h1, w1)
    assert cond.min() >= 0 and cond.max() <= 1
    assert torch.equal(crop_to(cond, plan.work_size), work)
    # Stand-in for the SR model: its output has the padded size.
    out = finish_output(cond, plan)
    assert (out.shape[-1], out.shape[-2]) == plan.out_size == (w * s, h * s)
    assert out.shape[:2] == (2, 3)
    assert out.min() >= 0 and out.max() <= 1


def test_finish_output_crops_padding_without_resize():
    plan = plan_size(333, 517, 4)  # work == out size, pad (4, 4)
    w1, h1 = plan.work_size
    sr = torch.full((1, 3, plan.padded_size[1], plan.padded_size[0]), 2.0)  # padding: out of range
    sr[..., :h1, :w1] = 0.25
    out = finish_output(sr, plan)
    assert out.shape == (1, 3, 2068, 1332)
    assert torch.equal(out, torch.full_like(out, 0.25))


def test_prepare_condition_clamps_bicubic_overshoot():
    # A hard edge overshoots under bicubic upsampling; output must stay in [0, 1].
    x = torch.zeros(1, 3, 8, 8)
    x[..., :, 4:] = 1.0
    plan = plan_size(8, 8, 1, process_size=64)
    cond, work = prepare_condition(x, plan)
    assert plan.work_size == (64, 64)
    assert work.min() == 0 and work.max() == 1


def test_size_mismatch_raises():
    plan = plan_size(10, 12, 2)
    with pytest.raises(ValueError):
        prepare_condition(_rand(1, 10, 12), plan)  # (W, H) swapped
    with pytest.raises(ValueError):
        finish_output(_rand(1, 24, 20), plan)  # work size, not padded size
