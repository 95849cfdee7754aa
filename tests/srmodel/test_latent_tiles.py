"""Latent tiling: tile grids, Gaussian blend weights, and seam-free tiled denoising."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from srmodel import SemanticControlNet, SemanticUNet, denoise
from srmodel.sampling.ddpm import make_scheduler
from srmodel.sampling.latent_tiles import Tile, blend_weights, gaussian_weights, tile_grid, tile_starts

PARITY = Path(__file__).parents[1] / "data" / "reference" / "parity"

# (length, tile, overlap), including lengths that are not a multiple of the stride.
STARTS_CASES = [
    (16, 8, 4), (24, 8, 4), (17, 8, 3), (29, 8, 3), (100, 8, 7), (13, 16, 5), (40, 16, 5),
    (64, 32, 16), (33, 8, 0), (9, 8, 1), (8, 8, 4), (5, 8, 4), (1, 1, 0), (97, 10, 9),
]


# ---------------------------------------------------------------- tile_starts / tile_grid


@pytest.mark.parametrize("length,tile,overlap", STARTS_CASES)
def test_tile_starts_cover_and_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts == sorted(set(starts)), "starts must be unique and increasing"
    assert starts[0] == 0
    assert starts[-1] == length - size, "the last tile snaps to the border"
    covered = torch.zeros(length, dtype=torch.int64)
    for s in starts:
        assert 0 <= s and s + size <= length, "tile out of bounds"
        covered[s : s + size] += 1
    assert (covered > 0).all(), "every pixel covered"
    for a, b in zip(starts, starts[1:]):
        assert a + size - b >= overlap, f"neighbours {a},{b} overlap less than {overlap}"
    if length <= tile:
        assert starts == [0]
    else:
        assert len(starts) >= 2


@pytest.mark.parametrize("length,tile", [(1, 1), (5, 8), (8, 8), (16, 64)])
def test_tile_starts_single_tile_when_short(length, tile):
    assert tile_starts(length, tile, 0) == [0]
    assert tile_starts(length, tile, tile - 1) == [0]


@pytest.mark.parametrize("tile,overlap", [(8, 8), (8, 9), (0, 0), (-4, 0), (8, -1), (1, 1)])
def test_tile_starts_bad_args(tile, overlap):
    with pytest.raises(ValueError):
        tile_starts(32, tile, overlap)
    with pytest.raises(ValueError):
        tile_starts(4, tile, overlap)  # even when a single tile would do
    with pytest.raises(ValueError):
        tile_grid(32, 32, tile, overlap)


@pytest.mark.parametrize(
    "height,width,tile,overlap",
    [(16, 24, 8, 4), (17, 29, 8, 3), (40, 13, 16, 5), (9, 100, 8, 7), (64, 64, 32, 16), (8, 8, 8, 4), (5, 30, 8, 2)],
)
def test_tile_grid_covers_image(height, width, tile, overlap):
    grid = tile_grid(height, width, tile, overlap, image=3)
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    assert len(grid) == len(ys) * len(xs)
    assert {(t.y, t.x) for t in grid} == {(y, x) for y in ys for x in xs}
    covered = torch.zeros(height, width, dtype=torch.int64)
    for t in grid:
        assert isinstance(t, Tile) and t.image == 3
        assert (t.h, t.w) == (min(tile, height), min(tile, width))
        assert 0 <= t.y and t.y + t.h <= height and 0 <= t.x and t.x + t.w <= width
        covered[t.y : t.y + t.h, t.x : t.x + t.w] += 1
    assert (covered > 0).all()
    assert max(t.y + t.h for t in grid) == height and max(t.x + t.w for t in grid) == width


def test_tile_grid_single_tile():
    assert tile_grid(6, 7, 8, 4, image=1) == [Tile(1, 0, 0, 6, 7)]
    assert tile_grid(8, 8, 8, 4) == [Tile(0, 0, 0, 8, 8)]


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("h,w", [(8, 8), (7, 7), (8, 13), (16, 5), (1, 6), (2, 2)])
def test_gaussian_weights_symmetric_peak_at_centre(h, w):
    g = gaussian_weights(h, w)
    assert g.shape == (h, w) and g.dtype == torch.float64
    assert (g > 0).all()
    torch.testing.assert_close(g, g.flip(0), atol=0, rtol=0)
    torch.testing.assert_close(g, g.flip(1), atol=0, rtol=0)
    cy, cx = (h - 1) // 2, (w - 1) // 2  # one of the (up to 4) centre pixels
    assert g[cy, cx] == g.max()
    # strictly decreasing away from the centre along both axes
    row, col = g[cy], g[:, cx]
    assert (row[cx + 1 :].diff() < 0).all() and (row[: cx + 1].diff() > 0).all()
    assert (col[cy + 1 :].diff() < 0).all() and (col[: cy + 1].diff() > 0).all()


BLEND_CASES = [
    (16, 24, 8, 4), (17, 29, 8, 3), (40, 13, 16, 5), (9, 100, 8, 7), (64, 48, 32, 16),
    (33, 33, 8, 0), (30, 22, 12, 6), (5, 30, 8, 2),
]


@pytest.mark.parametrize("height,width,tile,overlap", BLEND_CASES)
def test_blend_weights_partition_of_unity(height, width, tile, overlap):
    grid = tile_grid(height, width, tile, overlap)
    weights = blend_weights(height, width, grid)
    assert len(weights) == len(grid) > 1
    canvas = torch.zeros(height, width, dtype=torch.float64)
    for t, w in zip(grid, weights):
        assert w.shape == (t.h, t.w)
        assert (w >= 0).all() and (w <= 1 + 1e-12).all()
        canvas[t.y : t.y + t.h, t.x : t.x + t.w] += w
    torch.testing.assert_close(canvas, torch.ones_like(canvas), atol=1e-12, rtol=0)


def test_blend_weights_single_tile_all_ones():
    (w,) = blend_weights(6, 9, [Tile(0, 0, 0, 6, 9)])
    torch.testing.assert_close(w, torch.ones(6, 9, dtype=torch.float64), atol=0, rtol=0)


def test_blend_weights_uncovered_pixels_rejected():
    with pytest.raises(AssertionError):
        blend_weights(8, 8, [Tile(0, 0, 0, 4, 8), Tile(0, 0, 0, 4, 8)])


# ---------------------------------------------------------------- denoise with a per-pixel stand-in model


class _Recorder:
    def __init__(self, dtype):
        self.dtype = dtype
        self.calls = []  # (batch size, spatial shape, text rows)


class LocalControlNet(_Recorder):
    """Per-latent-pixel: the control image is average-pooled over each 8x8 block."""

    def __call__(self, x, t, *, encoder_hidden_states, controlnet_cond, image_encoder_hidden_states,
                 conditioning_scale, return_dict):
        assert return_dict is False
        assert controlnet_cond.shape[-2:] == (8 * x.shape[-2], 8 * x.shape[-1])
        assert encoder_hidden_states.shape[0] == image_encoder_hidden_states.shape[0] == x.shape[0]
        self.calls.append((x.shape[0], tuple(x.shape[-2:])))
        pooled = F.avg_pool2d(controlnet_cond.to(self.dtype), 8)  # (n,3,h,w)
        mid = encoder_hidden_states.mean((1, 2)) + 0.5 * image_encoder_hidden_states.mean((1, 2))
        return [pooled * conditioning_scale], mid * conditioning_scale


class LocalUNet(_Recorder):
    """eps depends only on the same latent pixel (no spatial context at all)."""

    mix = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.4, -0.3], [0.2, 0.2, 0.2], [-0.5, 0.1, 0.3]])

    def __call__(self, x, t, *, encoder_hidden_states, image_encoder_hidden_states,
                 down_block_additional_residuals, mid_block_additional_residual, return_dict):
        assert return_dict is False and x.dtype == self.dtype
        self.calls.append((x.shape[0], tuple(x.shape[-2:])))
        if len(self.calls) == 1:
            self.first_text = encoder_hidden_states.clone()
        (pooled,) = down_block_additional_residuals
        text = encoder_hidden_states.mean((1, 2))[:, None, None, None]
        toks = image_encoder_hidden_states.mean((1, 2))[:, None, None, None]
        ctrl = torch.einsum("oc,nchw->nohw", self.mix.to(x), pooled)
        eps = torch.tanh(x * (1 + 0.2 * text)) * (int(t) / 1000 + 0.5) + ctrl + 0.1 * toks * x
        eps = eps + 0.05 * mid_block_additional_residual[:, None, None, None] * x**2
        return (eps,)


B, H, W = 2, 16, 24


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    return dict(
        latents=torch.randn(B, 4, H, W, generator=g, dtype=torch.float64),
        prompt_embeds=torch.randn(B, 77, 32, generator=g),
        negative_prompt_embeds=torch.randn(1, 77, 32, generator=g),
        image_tokens=torch.randn(B, 5, 512, generator=g),
        control_image=torch.rand(B, 3, 8 * H, 8 * W, generator=g),
    )


def _sched(n=3):
    s = make_scheduler()
    s.set_timesteps(n)
    return s


def _run_local(inputs, dtype=torch.float64, latent_dtype=torch.float64, **kw):
    unet, controlnet = LocalUNet(dtype), LocalControlNet(dtype)
    kw = dict(dict(guidance_scale=4.0, cfg=True, conditioning_scale=0.8), **kw)
    d = dict(inputs, latents=inputs["latents"].to(latent_dtype))
    gens = [torch.Generator().manual_seed(100 + b) for b in range(B)]
    out = denoise(unet, controlnet, _sched(), d.pop("latents"), generators=gens, **d, **kw)
    return out, unet, controlnet


@pytest.fixture(scope="module")
def untiled(inputs):
    cache = {}

    def get(dtype):
        if dtype not in cache:
            out, unet, _ = _run_local(inputs, dtype, dtype, tile_size=None)
            assert {c[1] for c in unet.calls} == {(H, W)}
            cache[dtype] = out
        return cache[dtype]

    return get


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("tile,overlap", [(8, 4), (8, 3), (12, 5), (16, 8), (10, 0)])
def test_tiled_equals_untiled_for_per_pixel_model(inputs, untiled, dtype, atol, tile, overlap):
    ref = untiled(dtype)
    out, unet, _ = _run_local(inputs, dtype, dtype, tile_size=tile, tile_overlap=overlap)
    # the run really was tiled, with tiles smaller than the latent
    assert {c[1] for c in unet.calls} == {(min(tile, H), min(tile, W))}
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    # and the output is not trivially insensitive to the inputs
    assert (out - inputs["latents"].to(dtype)).abs().max() > 0.1


def test_tiled_per_pixel_model_sensitive_to_misplacement(inputs):
    """The per-pixel check above would catch tiles written back to the wrong place."""
    ref, _, _ = _run_local(inputs, tile_size=None)
    rolled = dict(inputs, control_image=inputs["control_image"].roll(8, dims=-1))
    other, _, _ = _run_local(rolled, tile_size=None)
    assert (other - ref).abs().max() > 1e-3


def test_tiles_go_through_model_as_one_batch(inputs):
    tile, overlap = 8, 4
    n_tiles = len(tile_grid(H, W, tile, overlap))
    assert n_tiles == 3 * 5
    rows = B * n_tiles * 2  # two CFG branches
    steps = len(_sched().timesteps)

    big, unet, controlnet = _run_local(inputs, tile_size=tile, tile_overlap=overlap, max_batch=10_000)
    for rec in (unet, controlnet):
        assert [c[0] for c in rec.calls] == [rows] * steps  # one forward per step holding every row
    # the rows are [uncond, cond] per tile, tiles of image 0 then image 1
    text = unet.first_text
    neg, pos = inputs["negative_prompt_embeds"][0], inputs["prompt_embeds"]
    expected = torch.stack([e for b in range(B) for _ in range(n_tiles) for e in (neg, pos[b])])
    torch.testing.assert_close(text, expected.to(text.dtype), atol=0, rtol=0)

    one, unet1, controlnet1 = _run_local(inputs, tile_size=tile, tile_overlap=overlap, max_batch=1)
    for rec in (unet1, controlnet1):
        assert [c[0] for c in rec.calls] == [1] * (rows * steps)
    torch.testing.assert_close(one, big, atol=1e-12, rtol=0)

    mid, unet7, _ = _run_local(inputs, tile_size=tile, tile_overlap=overlap, max_batch=7)
    assert [c[0] for c in unet7.calls] == ([7] * (rows // 7) + [rows % 7]) * steps
    torch.testing.assert_close(mid, big, atol=1e-12, rtol=0)

    # without CFG there is one row per tile
    _, unet_nocfg, _ = _run_local(inputs, cfg=False, tile_size=tile, tile_overlap=overlap, max_batch=10_000)
    assert [c[0] for c in unet_nocfg.calls] == [B * n_tiles] * steps


# ---------------------------------------------------------------- real tiny models


@pytest.fixture(scope="module")
def models():
    unet = SemanticUNet.from_pretrained(PARITY / "unet", torch_dtype=torch.float32)
    controlnet = SemanticControlNet.from_pretrained(PARITY / "controlnet", torch_dtype=torch.float32)
    return unet, controlnet


class _Spy:
    def __init__(self, model):
        self.model, self.dtype, self.shapes = model, model.dtype, []

    def __call__(self, x, *args, **kw):
        self.shapes.append(tuple(x.shape))
        return self.model(x, *args, **kw)


def _run_real(models, inputs, **kw):
    unet, controlnet = _Spy(models[0]), _Spy(models[1])
    gens = [torch.Generator().manual_seed(200 + b) for b in range(B)]
    out = denoise(
        unet, controlnet, _sched(2), inputs["latents"].float(),
        prompt_embeds=inputs["prompt_embeds"], negative_prompt_embeds=inputs["negative_prompt_embeds"],
        image_tokens=inputs["image_tokens"], control_image=inputs["control_image"],
        guidance_scale=5.0, cfg=True, generators=gens, **kw,
    )
    return out, unet.shapes


def test_real_models_tiled(models, inputs):
    ref, ref_shapes = _run_real(models, inputs, tile_size=None)
    assert ref_shapes == [(2 * B, 4, H, W)] * 2
    tiled, shapes = _run_real(models, inputs, tile_size=16, tile_overlap=8)
    assert shapes == [(2 * B * 2, 4, 16, 16)] * 2  # two 16x16 tiles per image, both CFG branches, one forward
    assert tiled.shape == (B, 4, H, W) and tiled.dtype == torch.float32
    assert torch.isfinite(tiled).all()
    # The real UNet has spatial context, so tiling changes the result a little, but not wildly.
    diff = (tiled - ref).abs().max()
    assert 0 < diff < ref.abs().max()


@pytest.mark.parametrize("tile", [24, 32, 1000])
def test_real_models_tile_not_smaller_than_latent_is_untiled(models, inputs, tile):
    ref, _ = _run_real(models, inputs, tile_size=None)
    out, shapes = _run_real(models, inputs, tile_size=tile, tile_overlap=8)
    assert shapes == [(2 * B, 4, H, W)] * 2
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
