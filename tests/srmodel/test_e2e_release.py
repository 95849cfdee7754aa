"""End to end against the authors' own script: their outputs on tiny random weights (tests/data/e2e).

Each case ran `test_seesr_sam.py` unmodified on the tiny weights with recorded noise (see
tests/data/e2e/README.md). Here the same input, tokens, prompt and noise go through
`SemanticUpscaler.upscale` with the release image path in float32 on CPU, and every stage is
compared at the README's tolerances: the condition image exactly, final latents (max |d| <= 5e-4),
the decoded image (atol 3e-3, the reference is stored as float16), the pipeline's uint8 image
(max 2 LSB, >= 99.9 % equal) and the saved output (max 3 LSB, >= 99.9 % equal, mean <= 0.002).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from srmodel.config import ModelConfig, ModelSource, SamplerConfig, TilingConfig
from srmodel.imaging.image_paths import round_to_uint8
from srmodel.upscaler import SemanticUpscaler, SRRequest

pytestmark = pytest.mark.slow  # each case runs the whole release path on CPU (20-90 s)

DATA = Path(__file__).parents[1] / "data"
E2E = DATA / "e2e"
CASES = ["x4_cascade", "x1_tiled"]


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """The released layout: SD-2-base parts from e2e/, checkpoint-90000 = the parity unet/controlnet."""
    root = tmp_path_factory.mktemp("weights")
    (root / "checkpoint-90000").mkdir()
    for part in ("unet", "controlnet"):
        (root / "checkpoint-90000" / part).symlink_to((DATA / "reference" / "parity" / part).resolve())
    (root / "stable-diffusion-2-base").symlink_to((E2E / "weights" / "stable-diffusion-2-base").resolve())
    return root


def _config(settings: dict, weights: Path) -> ModelConfig:
    source = ModelSource(
        sd_base=str(weights / "stable-diffusion-2-base"),
        seesr=str(weights / "checkpoint-90000"),
        sam2_checkpoint="unused: the tokens are given",
    )
    sampler = SamplerConfig(
        steps=settings["num_inference_steps"],
        cfg=settings["cfg"],
        guidance_scale=settings["guidance_scale"] if settings["cfg"] else 1.0,
        negative_prompt=settings["negative_prompt"],
        start_point=settings["start_point"],
        conditioning_scale=settings["conditioning_scale"],
        color_fix=settings["align_method"],
        upscale=settings["upscale"],
        process_size=settings["process_size"],
    )
    tiling = TilingConfig(
        latent_tile=settings["latent_tiled_size"],
        latent_overlap=settings["latent_tiled_overlap"],
        vae_decoder_tile=settings["vae_decoder_tiled_size"],
        vae_encoder_tile=settings["vae_encoder_tiled_size"],
    )
    return ModelConfig(name="e2e", source=source, sampler=sampler, tiling=tiling, dtype="fp32", geometry="release")


@pytest.fixture(scope="module", params=CASES)
def case(request, weights):
    folder = E2E / "cases" / request.param
    settings = json.loads((folder / "settings.json").read_text())
    # tokens.safetensors is not copied: it is 0.5 * N(0, 1) from the recorded seed (checked equal).
    tokens = 0.5 * torch.randn(1, 4096, 256, generator=torch.Generator().manual_seed(settings["tokens"]["seed"]))
    noise = load_file(folder / "noise.safetensors")
    order = [r["name"] for r in settings["noise"]["requests_in_order"]]
    request_ = SRRequest(
        image=_png(folder / "input.png"),
        tokens=tokens[0],
        prompt=settings["final_prompt"],
        seed=settings["seed"],
        noise=[noise[name] for name in order],
    )
    upscaler = SemanticUpscaler.from_config(_config(settings, weights))
    # One pass through the public API; the stages' results are recorded on the way.
    seen = {}
    denoise, decode = upscaler.denoise, upscaler.decode
    upscaler.denoise = lambda reqs, **kw: seen.setdefault("denoised", denoise(reqs, **kw))
    upscaler.decode = lambda z: seen.setdefault("decoded", decode(z))
    (output,) = upscaler.upscale([request_])
    (denoised,) = seen["denoised"]
    return dict(
        name=request.param, folder=folder, settings=settings, upscaler=upscaler, output=output,
        denoised=denoised, decoded=seen["decoded"],
    )


def _compare_uint8(ours: np.ndarray, ref: np.ndarray) -> dict:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    d = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    return {"max": int(d.max()), "equal": float((d == 0).mean()), "mean": float(d.mean())}


def test_condition_image_equals_the_release(case):
    """The release's PIL resizes on uint8 (cascade, x s, stretch to a multiple of 8) bit for bit."""
    control = case["denoised"].reference
    ref = _png(case["folder"] / "control.png")
    assert control.shape == ref.shape
    assert np.array_equal(control, ref)
    assert tuple(case["settings"]["sizes_wh"]["control_image"]) == case["denoised"].plan.model_size


def test_final_latents(case):
    ref = load_file(case["folder"] / "final_latents.safetensors")["final_latents"][0]
    ours = case["denoised"].latents
    assert ours.shape == ref.shape
    d = (ours - ref).abs()
    print(f"{case['name']} final latents: max |d| {d.max():.3g}, mean {d.mean():.3g}, |ref| max {ref.abs().max():.3g}")
    assert d.max() <= 5e-4


def test_decoded(case):
    ref = load_file(case["folder"] / "decoded.safetensors")["decoded"].float()
    ours = case["decoded"]  # in [0, 1]; the reference is the raw decoder output in [-1, 1]-ish
    raw_ref = (ref / 2 + 0.5).clamp(0, 1)
    d = (ours - raw_ref).abs()
    print(f"{case['name']} decoded (clamped to [0, 1]): max |d| {d.max():.3g}, mean {d.mean():.3g}")
    assert d.max() <= 3e-3 / 2  # 3e-3 on the [-1, 1] scale


def test_pipeline_output(case):
    ours = round_to_uint8(case["decoded"])
    stats = _compare_uint8(ours, _png(case["folder"] / "pipeline_output.png"))
    print(f"{case['name']} pipeline_output.png: {stats}")
    assert stats["max"] <= 2 and stats["equal"] >= 0.999


def test_output_png_through_upscale(case):
    """The whole path through the public API: SemanticUpscaler.upscale with the recorded noise."""
    ours = case["output"]
    ref = _png(case["folder"] / "output.png")
    assert tuple(case["settings"]["sizes_wh"]["output"]) == (ours.shape[1], ours.shape[0])
    stats = _compare_uint8(ours, ref)
    print(f"{case['name']} output.png: {stats}")
    assert stats["max"] <= 3 and stats["equal"] >= 0.999 and stats["mean"] <= 0.002


def test_finish_on_the_authors_pipeline_output_is_exact(case):
    """Colour fix + truncation + final resize alone, from their uint8 image: bit for bit."""
    up, folder = case["upscaler"], case["folder"]
    pipeline_output = torch.from_numpy(_png(folder / "pipeline_output.png")).permute(2, 0, 1)[None].float() / 255
    ours = up.path.finish(pipeline_output, case["denoised"].reference, case["denoised"].plan, up.sampler.color_fix)
    assert np.array_equal(ours, _png(folder / "output.png"))
