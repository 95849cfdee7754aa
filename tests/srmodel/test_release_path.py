"""The release's image path piece by piece: sizes, resizes, tiling rule and window, tiled VAE,
rounding, the noise hook, and the fp16 loading rules (issue 8's D1-D9)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from srmodel import SemanticControlNet, SemanticUNet, WeightsError
from srmodel.imaging.sizes import plan_size
from srmodel.imaging.image_paths import ReleasePath, plan_release, to_tensor, truncate_to_uint8
from srmodel.sampling.noise import NoiseStream
from srmodel.models.image_attention import image_attention_modules
from srmodel.sampling.latent_tiles import gaussian_weights, plan_tiles
from srmodel.models.groupnorm_tiles import needs_tiling, split_tiles, tiled_forward

DATA = Path(__file__).parents[1] / "data"
PARITY = DATA / "reference" / "parity"
VAE = DATA / "e2e" / "weights" / "stable-diffusion-2-base" / "vae"


# ---------------------------------------------------------------- sizes (D1, D2, D11)


@pytest.mark.parametrize(
    "src,scale,cascade,model",
    [
        ((1280, 720), 1, None, (1280, 720)),
        ((1920, 1080), 1, None, (1920, 1080)),  # 1080 stays 1080 (stretch to 8), not padded to 1088
        ((96, 72), 4, (170, 128), (680, 512)),  # the e2e x4_cascade case
        ((60, 49), 4, (156, 127), (624, 504)),  # int(128/49*49) = 127: the release's float arithmetic
        ((333, 517), 4, None, (1328, 2064)),
    ],
)
def test_release_sizes(src, scale, cascade, model):
    plan = plan_release(*src, scale, 512)
    assert plan.cascade_size == cascade
    assert plan.model_size == model
    assert plan.out_size == (src[0] * scale, src[1] * scale)


def test_exact_size_keeps_integer_arithmetic():
    """The exact-size path gets 128 where the release's float formula truncates to 127."""
    assert plan_size(60, 49, 4, process_size=512).work_size == (624, 512)
    assert plan_release(60, 49, 4, 512).cascade_size == (156, 127)


def test_release_condition_is_three_pil_resizes():
    img = np.random.default_rng(0).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    path = ReleasePath(4, 512)
    plan = path.plan(96, 72)
    tensor, control = path.condition(img, plan)
    pil = Image.fromarray(img).resize((170, 128)).resize((680, 512)).resize((680, 512))
    assert np.array_equal(control, np.asarray(pil))
    assert torch.equal(tensor, to_tensor(control))


def test_release_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 8"):
        plan_release(3, 3, 1, 0)


# ---------------------------------------------------------------- latent tiling (D3, D4, D5)


def test_release_tiling_rule_and_square_tiles():
    # 1280x720 -> latent 90x160: three 90x90 tiles at x = 0, 58, 70 (the example)
    tiles = plan_tiles(90, 160, 96, 32, "release")
    assert [(t.y, t.x, t.h, t.w) for t in tiles] == [(0, 0, 90, 90), (0, 58, 90, 90), (0, 70, 90, 90)]
    # 960x540 -> 67x120 = 8040 <= 96^2: untiled as released; the exact-size rule tiles it
    assert len(plan_tiles(67, 120, 96, 32, "release")) == 1
    assert len(plan_tiles(67, 120, 96, 32, "exact-size")) > 1


def test_release_tiling_finishes_on_thin_images():
    """The release never terminates when the tile side is not above the overlap; we cap the overlap."""
    tiles = plan_tiles(20, 1000, 96, 32, "release")
    covered = torch.zeros(20, 1000)
    for t in tiles:
        assert (t.h, t.w) == (20, 20)
        covered[t.y : t.y + t.h, t.x : t.x + t.w] += 1
    assert (covered > 0).all()


def test_release_window_is_centred_at_h_over_2_down():
    w = gaussian_weights(81, 81, rule="release")
    sym = gaussian_weights(81, 81, rule="exact-size")
    col = w[:, 40]
    # y midpoint 40.5: rows 40 and 41 weigh the same; x midpoint 40: the centre column peaks
    assert torch.isclose(col[40], col[41]) and int(w[40].argmax()) == 40
    assert torch.equal(sym, sym.flip(0)) and not torch.equal(w, w.flip(0))
    rel = ((w / w.max()) - (sym / sym.max())).abs().max()
    assert rel > 0.03  # 0.039 at 81x81


# ---------------------------------------------------------------- tiled VAE (D6)


@pytest.fixture(scope="module")
def vae():
    return AutoencoderKL.from_pretrained(VAE).eval()


def test_tiled_vae_matches_the_authors_hook(vae):
    """tests/data/vae_tiles: the authors' VAEHook (utils/vaehook.py) run on the e2e tiny VAE.

    Decoder: latent 40x50, tile 16, pad 11 -> 4 tiles; encoder: 136x200 px, tile 64, pad 32 -> 6
    tiles. A plain forward differs from the hook by 0.05 here, so the GroupNorm sharing matters.
    """
    ref = load_file(DATA / "vae_tiles" / "vaehook_reference.safetensors")
    z = torch.randn(1, 4, 40, 50, generator=torch.Generator().manual_seed(7)) * 5
    x = torch.rand(1, 3, 136, 200, generator=torch.Generator().manual_seed(8)) * 2 - 1
    assert len(split_tiles(40, 50, 16, 11, True)[0]) == 4
    dec = tiled_forward(vae.decoder, z, 16, 11, is_decoder=True)
    enc = tiled_forward(vae.encoder, x, 64, 32, is_decoder=False)
    assert (dec - ref["decoded"]).abs().max() < 2e-5
    assert (enc - ref["encoded"]).abs().max() < 2e-5
    with torch.no_grad():
        assert (vae.decoder(z) - ref["decoded"]).abs().max() > 1e-2


def test_tiled_vae_one_tile_is_the_plain_forward(vae):
    z = torch.randn(2, 4, 20, 30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = vae.decoder(z)
    torch.testing.assert_close(tiled_forward(vae.decoder, z, 64, 11, True), plain, atol=5e-5, rtol=0)


def test_tiled_vae_statistics_are_per_image(vae):
    z = torch.randn(2, 4, 40, 50, generator=torch.Generator().manual_seed(2))
    both = tiled_forward(vae.decoder, z, 16, 11, True)
    for k in range(2):
        torch.testing.assert_close(both[k : k + 1], tiled_forward(vae.decoder, z[k : k + 1], 16, 11, True), atol=5e-5, rtol=0)


def test_decoder_tiling_threshold_is_246_latent():
    assert not needs_tiling(246, 100, 224, 11) and needs_tiling(247, 100, 224, 11)


# ---------------------------------------------------------------- rounding (D9)


def test_colour_fix_output_truncates():
    x = torch.tensor([0.5, 0.999, 0.0019, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert truncate_to_uint8(x)[..., 0].ravel().tolist() == [127, 254, 0, 255]


# ---------------------------------------------------------------- noise hook


def test_noise_stream_gives_the_given_tensors_then_errors():
    given = [torch.full((1, 4, 2, 3), float(i)) for i in range(2)]
    s = NoiseStream(seed=1, given=given)
    assert torch.equal(s.next((4, 2, 3)), given[0][0]) and torch.equal(s.next((4, 2, 3)), given[1][0])
    with pytest.raises(ValueError, match="2 tensors"):
        s.next((4, 2, 3))
    with pytest.raises(ValueError, match="expected"):
        NoiseStream(seed=1, given=[torch.zeros(1, 4, 3, 3)]).next((4, 2, 3))


def test_given_noise_equal_to_the_seed_draws_changes_nothing():
    a, b = NoiseStream(seed=5), NoiseStream(seed=5)
    given = [a.next((4, 3, 5)).unsqueeze(0) for _ in range(3)]
    c = NoiseStream(seed=99, given=given)
    for _ in range(3):
        assert torch.equal(c.next((4, 3, 5)), b.next((4, 3, 5)))


# ---------------------------------------------------------------- fp16 loading (D7, D8, item 5)


def test_fold_happens_before_the_half_cast():
    ref = SemanticUNet.from_pretrained(PARITY / "unet", torch_dtype=torch.float32)
    half = SemanticUNet.from_pretrained(PARITY / "unet", torch_dtype=torch.float16, fold_kv=True)
    for full_m, half_m in zip(image_attention_modules(ref), image_attention_modules(half)):
        w = full_m.transformer_blocks[0].attn2.to_k.weight
        d = w.shape[1] // 2
        folded = half_m.transformer_blocks[0].attn2.to_k.weight
        assert folded.dtype == torch.float16
        assert torch.equal(folded, (w[:, :d] + w[:, d:]).half())


@pytest.mark.parametrize("key,value", [("class_embed_type", "timestep"), ("time_embedding_act_fn", "silu"),
                                       ("center_input_sample", True), ("addition_embed_type", "text")])
@pytest.mark.parametrize("cls,part", [(SemanticUNet, "unet"), (SemanticControlNet, "controlnet")])
def test_config_keys_the_forward_ignores_are_refused(tmp_path, cls, part, key, value):
    folder = tmp_path / part
    shutil.copytree(PARITY / part, folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=key):
        cls.from_pretrained(folder)
