"""Presets, strict configs, the params hash, and the tiny model folder (formats, loaders, concurrency)."""

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from pydantic import ValidationError
from safetensors.torch import load_file

import srmodel.tiny as tiny
from srmodel import (
    PRESET_NAMES,
    ModelConfig,
    ModelSource,
    SamplerConfig,
    SemanticControlNet,
    SemanticEncoder,
    SemanticUNet,
    TextConditioner,
    TilingConfig,
    ensure_tiny_model,
    get_preset,
)
from srmodel.sampling.ddpm import make_scheduler
from srmodel.models.vae import load_vae

WILD_ADDED = "clean, high-resolution, 8k, ultra-detailed, ultra-realistic"
SYNTHETIC_ADDED = "clean, high-resolution, 8k"
NEGATIVE = "dotted, noise, blur, lowres, smooth"
DDPM_50 = Path(__file__).parents[1] / "data" / "reference" / "parity" / "ddpm_50.json"


def source(revision="checkpoint-90000", **kw):
    return ModelSource(sd_base="/m/sd2-base", seesr="/m/seesr", sam2_checkpoint="/m/sam2.pt", revision=revision, **kw)


# ----------------------------------------------------------------------------- presets


def test_wild_preset():
    cfg = get_preset("wild", source())
    s = cfg.sampler
    assert cfg.name == "wild"
    assert (s.upscale, s.cfg, s.guidance_scale, s.steps, s.color_fix) == (1, True, 8.5, 50, "adain")
    assert s.added_prompt == WILD_ADDED
    assert s.negative_prompt == NEGATIVE
    assert s.user_prompt == "" and s.start_point == "noise"
    assert cfg.source == source()


def test_synthetic_preset():
    cfg = get_preset("synthetic", source())
    s = cfg.sampler
    assert (s.upscale, s.cfg, s.steps, s.color_fix) == (4, False, 50, "adain")
    assert s.added_prompt == SYNTHETIC_ADDED
    assert s.negative_prompt == NEGATIVE


def test_tiny_preset():
    cfg = get_preset("tiny")
    assert cfg.source is None and cfg.dtype == "fp32" and cfg.torch_dtype == torch.float32
    assert cfg.sampler.steps < 50 and cfg.tiling.latent_overlap < cfg.tiling.latent_tile
    assert cfg.sampler.negative_prompt == NEGATIVE


def test_real_presets_default_to_fp16_and_release_tiling():
    for name in ("wild", "synthetic"):
        cfg = get_preset(name, source())
        assert cfg.dtype == "fp16" and cfg.torch_dtype == torch.float16
        assert (cfg.tiling.latent_tile, cfg.tiling.latent_overlap) == (96, 32)  # 768 px tiles as released


def test_unknown_preset():
    with pytest.raises(ValueError) as info:
        get_preset("realistic")
    msg = str(info.value)
    assert "realistic" in msg
    for name in PRESET_NAMES:
        assert name in msg
    assert set(PRESET_NAMES) == {"wild", "synthetic", "tiny"}


# ----------------------------------------------------------------------------- strict configs


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (SamplerConfig, {"stepz": 20}),
        (TilingConfig, {"tile": 64}),
        (ModelSource, {"sd_base": "a", "seesr": "b", "sam2_checkpoint": "c", "vae": "d"}),
        (ModelConfig, {"name": "x", "precision": "fp16"}),
        (ModelConfig, {"name": "x", "sampler": {"guidance": 3.0}}),
    ],
)
def test_unknown_keys_rejected(cls, kwargs):
    with pytest.raises(ValidationError) as info:
        cls(**kwargs) if cls is not ModelConfig else ModelConfig.model_validate(kwargs)
    assert "extra" in str(info.value).lower() or "not permitted" in str(info.value).lower()


@pytest.mark.parametrize("gs", [0.9, 1.0, 0.0])
def test_cfg_needs_guidance_above_one(gs):
    with pytest.raises(ValidationError) as info:
        SamplerConfig(cfg=True, guidance_scale=gs)
    msg = str(info.value)
    assert "0.9" in msg and "no CFG" in msg and "cfg=false" in msg
    SamplerConfig(cfg=False, guidance_scale=gs)  # the release's gs 0.9 = CFG off: fine


def test_overlap_must_be_smaller_than_tile():
    with pytest.raises(ValidationError, match="latent_overlap"):
        TilingConfig(latent_tile=32, latent_overlap=32)
    with pytest.raises(ValidationError, match="latent_overlap"):
        TilingConfig(latent_tile=32, latent_overlap=40)
    TilingConfig(latent_tile=32, latent_overlap=31)


def test_field_bounds():
    for bad in ({"steps": 0}, {"upscale": 0}, {"color_fix": "histogram"}, {"start_point": "image"}):
        with pytest.raises(ValidationError):
            SamplerConfig(**bad)
    with pytest.raises(ValidationError):
        ModelConfig(name="x", dtype="fp8")


def test_configs_are_frozen():
    cfg = get_preset("wild", source())
    with pytest.raises(ValidationError):
        cfg.sampler.steps = 10


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_round_trips(name):
    cfg = get_preset(name, None if name == "tiny" else source())
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg
    assert ModelConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert ModelConfig.model_validate(json.loads(json.dumps(cfg.model_dump()))) == cfg
    assert ModelConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump()))) == cfg
    assert ModelConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump()))).params_hash() == cfg.params_hash()


# ----------------------------------------------------------------------------- params hash


def with_changes(cfg: ModelConfig, **changes) -> ModelConfig:
    """A validated copy with nested dict updates, e.g. sampler={"steps": 20}."""
    data = cfg.model_dump()
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return ModelConfig.model_validate(data)


def test_params_hash_stable():
    a, b = get_preset("wild", source()), get_preset("wild", source())
    assert a is not b
    assert a.params_hash() == a.params_hash() == b.params_hash()
    built = ModelConfig(
        name="wild",
        source=source(),
        sampler=SamplerConfig(upscale=1, cfg=True, guidance_scale=8.5, added_prompt=WILD_ADDED),
    )
    assert built.params_hash() == a.params_hash()
    assert len(a.params_hash()) == 16 and int(a.params_hash(), 16) >= 0
    # guidance given as an int is the same setting as the float
    assert with_changes(a, sampler={"guidance_scale": 8}).params_hash() == with_changes(
        a, sampler={"guidance_scale": 8.0}
    ).params_hash()


@pytest.mark.parametrize(
    "changes",
    [
        {"sampler": {"steps": 20}},
        {"sampler": {"guidance_scale": 7.5}},
        {"sampler": {"upscale": 2}},
        {"sampler": {"color_fix": "wavelet"}},
        {"sampler": {"color_fix": "none"}},
        {"sampler": {"user_prompt": "a cat"}},
        {"sampler": {"added_prompt": SYNTHETIC_ADDED}},
        {"sampler": {"negative_prompt": ""}},
        {"sampler": {"cfg": False}},
        {"sampler": {"start_point": "lr"}},
        {"dtype": "bf16"},
        {"dtype": "fp32"},
        {"tiling": {"latent_tile": 64}},
        {"tiling": {"latent_overlap": 16}},
    ],
    ids=lambda c: json.dumps(c),
)
def test_params_hash_changes_with_pixel_settings(changes):
    base = get_preset("wild", source())
    assert with_changes(base, **changes).params_hash() != base.params_hash()


def test_params_hash_changes_with_revision():
    a = get_preset("wild", source(revision="checkpoint-90000"))
    b = get_preset("wild", source(revision="checkpoint-80000"))
    assert a.params_hash() != b.params_hash()
    # ...but not with where the same revision is staged
    c = get_preset("wild", ModelSource(sd_base="/x", seesr="/y", sam2_checkpoint="/z", revision="checkpoint-90000"))
    assert c.params_hash() == a.params_hash()


def test_params_hash_ignores_max_batch():
    base = get_preset("wild", source())
    for n in (1, 4, 64):
        assert with_changes(base, tiling={"max_batch": n}).params_hash() == base.params_hash()


def test_params_hash_of_presets_differ():
    hashes = {get_preset("wild", source()).params_hash(), get_preset("synthetic", source()).params_hash(),
              get_preset("tiny").params_hash()}
    assert len(hashes) == 3


# ----------------------------------------------------------------------------- tiny model folder


def test_tiny_model_built_once(tiny_model, tmp_path):
    folder = Path(tiny_model.seesr).parent
    assert (folder / "COMPLETE").is_file()
    watched = [folder / "COMPLETE", Path(tiny_model.seesr) / "unet" / "diffusion_pytorch_model.safetensors",
               Path(tiny_model.sam2_checkpoint)]
    before = [p.stat().st_mtime_ns for p in watched]
    again = ensure_tiny_model(folder.parent)
    assert again == tiny_model
    assert [p.stat().st_mtime_ns for p in watched] == before
    # no temp build left behind (weights staged from object storage live beside it, in staged/)
    assert sorted(p.name for p in folder.parent.iterdir() if p.name != "staged") == [folder.name]


def test_tiny_model_files(tiny_model):
    sd, seesr = Path(tiny_model.sd_base), Path(tiny_model.seesr)
    for sub in ("unet", "controlnet"):
        assert (seesr / sub / "config.json").is_file()
        assert (seesr / sub / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((seesr / "unet" / "config.json").read_text())["use_image_cross_attention"] is True
    assert (sd / "tokenizer").is_dir() and any((sd / "tokenizer").iterdir())
    assert (sd / "text_encoder" / "config.json").is_file()
    assert (sd / "vae" / "config.json").is_file()
    sched = json.loads((sd / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["steps_offset"] == 1

    ckpt = torch.load(tiny_model.sam2_checkpoint, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model"} and isinstance(ckpt["model"], dict)
    keys = set(ckpt["model"])
    assert any(k.startswith("image_encoder.trunk.") for k in keys)
    assert any(k.startswith("image_encoder.neck.") for k in keys)
    assert "no_mem_embed" in keys
    assert any(k.startswith("sam_mask_decoder.") for k in keys)  # junk heads the loader must skip
    assert any(k.startswith("memory_encoder.") for k in keys)
    assert Path(tiny_model.sam2_config).is_file()
    assert tiny_model.revision == tiny.TINY_VERSION


def test_tiny_model_loads_through_real_loaders(tiny_model):
    start = time.perf_counter()
    unet = SemanticUNet.from_pretrained(tiny_model.seesr, subfolder="unet")
    controlnet = SemanticControlNet.from_pretrained(Path(tiny_model.seesr) / "controlnet")
    encoder = SemanticEncoder.from_pretrained(tiny_model.sam2_checkpoint, tiny_model.sam2_config)
    text = TextConditioner.from_pretrained(tiny_model.sd_base)
    vae = load_vae(tiny_model.sd_base)
    sched = make_scheduler(tiny_model.sd_base)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"loading the tiny model took {elapsed:.1f}s"

    assert isinstance(sched, DDPMScheduler)
    sched.set_timesteps(50)
    timesteps = sched.timesteps.tolist()
    assert timesteps == list(range(981, 0, -20))
    assert timesteps == json.loads(DDPM_50.read_text())["timesteps"]

    assert unet.config.cross_attention_dim == text.text_encoder.config.hidden_size == tiny.TEXT_DIM
    assert sum(".image_attentions." in k for k in unet.state_dict()) > 0
    assert sum(".image_attentions." in k for k in controlnet.state_dict()) > 0
    # The ControlNet's zero convs were perturbed, so its path is live.
    assert controlnet.controlnet_mid_block.weight.abs().max() > 0
    assert encoder.d_model * 2 == unet.image_token_dim
    assert vae.config.latent_channels == unet.config.in_channels == 4

    # One tiny pass through every part fits together.
    with torch.no_grad():
        tokens = encoder.encode([torch.zeros(32, 48, 3, dtype=torch.uint8).numpy()])
        prompt = text.encode(["a dog"])
        latent = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        down, mid = controlnet(latent, 981, encoder_hidden_states=prompt, controlnet_cond=torch.zeros(1, 3, 64, 64),
                               image_encoder_hidden_states=tokens, return_dict=False)
        eps = unet(latent, 981, encoder_hidden_states=prompt, image_encoder_hidden_states=tokens,
                   down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]
    assert eps.shape == latent.shape and torch.isfinite(eps).all()


@pytest.mark.slow  # builds the tiny model again
def test_tiny_model_build_that_loses_the_race(tiny_model, tmp_path, monkeypatch):
    """If another process renames its complete folder into place first, the loser keeps the winner's."""
    winner = Path(tiny_model.seesr).parent
    real_write = tiny._write_tiny

    def write_and_lose(tmp):
        real_write(tmp)
        shutil.copytree(winner, tmp_path / tiny.TINY_VERSION)

    monkeypatch.setattr(tiny, "_write_tiny", write_and_lose)
    start = time.perf_counter()
    src = ensure_tiny_model(tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"building the tiny model took {elapsed:.1f}s"
    assert src == tiny.tiny_source(tmp_path / tiny.TINY_VERSION)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny.TINY_VERSION]  # the loser's temp folder is gone
    assert (tmp_path / tiny.TINY_VERSION / "COMPLETE").is_file()


@pytest.mark.slow  # several processes build the tiny model
def test_tiny_model_concurrent_builders(tiny_model, tmp_path):
    """A spawned process and this one build into the same fresh folder at the same time."""
    cache = tmp_path / "shared-cache"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        other = pool.apply_async(ensure_tiny_model, (cache,))
        deadline = time.monotonic() + 120
        # Start our own build once the other process is busy building (its temp folder exists).
        while not other.ready() and time.monotonic() < deadline:
            if cache.is_dir() and any(p.name.startswith(f".{tiny.TINY_VERSION}-") for p in cache.iterdir()):
                break
            time.sleep(0.005)
        ours = ensure_tiny_model(cache)
        theirs = other.get(timeout=120)
        # The params hash is the same in another process (no hash randomisation leaks in).
        cfg = get_preset("wild", source())
        assert pool.apply(cfg.params_hash) == cfg.params_hash()
    assert ours == theirs == tiny.tiny_source(cache / tiny.TINY_VERSION)
    assert sorted(os.listdir(cache)) == [tiny.TINY_VERSION]  # one folder, no temp build left behind
    assert (cache / tiny.TINY_VERSION / "COMPLETE").read_text() == tiny.TINY_VERSION
    SemanticUNet.from_pretrained(ours.seesr, subfolder="unet")
    SemanticControlNet.from_pretrained(ours.seesr, subfolder="controlnet")
    # Every build writes the same weights (seeded), whichever process won.
    for sub in ("unet", "controlnet"):
        a = load_file(str(Path(tiny_model.seesr) / sub / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(Path(ours.seesr) / sub / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    SemanticEncoder.from_pretrained(ours.sam2_checkpoint, ours.sam2_config)
    TextConditioner.from_pretrained(ours.sd_base)
