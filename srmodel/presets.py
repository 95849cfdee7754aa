"""Named presets: the paper's two tracks and a tiny random model for tests and benchmarks."""

from __future__ import annotations

from .config import (
    NEGATIVE_PROMPT,
    SYNTHETIC_ADDED_PROMPT,
    WILD_ADDED_PROMPT,
    ModelConfig,
    ModelSource,
    SamplerConfig,
    TilingConfig,
)

PRESET_NAMES = ("wild", "synthetic", "tiny")


def get_preset(name: str, source: ModelSource | None = None) -> ModelConfig:
    """`wild` and `synthetic` need a ModelSource (the released weights); `tiny` builds its own."""
    if name == "wild":  # NTIRE 2025 wild track: x1, CFG 8.5
        sampler = SamplerConfig(upscale=1, cfg=True, guidance_scale=8.5, added_prompt=WILD_ADDED_PROMPT)
        return ModelConfig(name=name, source=source, sampler=sampler)
    if name == "synthetic":  # x4 track: the README's "gs 0.9" = CFG off
        sampler = SamplerConfig(
            upscale=4, cfg=False, guidance_scale=1.0, added_prompt=SYNTHETIC_ADDED_PROMPT, negative_prompt=NEGATIVE_PROMPT
        )
        return ModelConfig(name=name, source=source, sampler=sampler)
    if name == "tiny":  # random weights: exercises every code path in seconds; never for quality
        sampler = SamplerConfig(upscale=4, steps=4, cfg=True, guidance_scale=4.0, process_size=64)
        tiling = TilingConfig(
            latent_tile=16, latent_overlap=4, vae_tile=128, vae_decoder_tile=16, vae_encoder_tile=128, max_batch=16,
            pad_multiple=32,
        )
        return ModelConfig(name=name, source=source, sampler=sampler, tiling=tiling, dtype="fp32")
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
