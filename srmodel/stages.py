"""Build the stages' models from a ModelConfig (the tiny preset builds its weights on first use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config import ModelConfig
from .tiny import ensure_tiny_model

if TYPE_CHECKING:  # imported where used: each stage loads only its own libraries
    from .semantic.sam2_encoder import SemanticEncoder
    from .upscaler import SemanticUpscaler


def resolve(config: ModelConfig) -> ModelConfig:
    """The same config with a concrete ModelSource."""
    if config.source is not None:
        return config
    if config.name == "tiny":
        return config.model_copy(update={"source": ensure_tiny_model()})
    raise ValueError(
        f"preset {config.name!r} needs the released weights: pass --weights DIR (a folder with "
        "stable-diffusion-2-base/, checkpoint-90000/, sam2.1_hiera_tiny.pt) or a model source in the job config"
    )


def load_semantic_encoder(config: ModelConfig, device="cpu") -> "SemanticEncoder":
    from .semantic.sam2_encoder import SemanticEncoder

    config = resolve(config)
    # SAM2 runs in fp32 whatever the model dtype, as released (its tokens are cast at the attention):
    # it is ~1% of the work.
    return SemanticEncoder.from_pretrained(
        config.source.sam2_checkpoint, config.source.sam2_config, device=device, dtype=torch.float32
    )


def load_upscaler(config: ModelConfig, device="cpu") -> "SemanticUpscaler":
    from .upscaler import SemanticUpscaler

    return SemanticUpscaler.from_config(resolve(config), device=device)


def load_tagger(config: ModelConfig, device="cpu"):
    """The prompt's tag source: RAM + DAPE (fp32, as released) or a fixed string."""
    from .prompts import FixedTagger

    config = resolve(config)
    s, src = config.sampler, config.source
    if s.prompt_source == "fixed":
        return FixedTagger(s.fixed_tags)
    if not src.ram:
        raise ValueError(
            "prompt_source=tagger needs the RAM weights (ram_swin_large_14m.pth, DAPE.pth in the model source); "
            "or use prompt_source=fixed"
        )
    from .ram import TINY_RAM_CONFIG, RAMConfig, load_tagger as load_ram
    from .ram.model import TAG_LIST, THRESHOLDS

    return load_ram(
        src.ram, src.dape, config=TINY_RAM_CONFIG if src.ram_config == "tiny" else RAMConfig(),
        tag_list=src.ram_tag_list or TAG_LIST, thresholds=src.ram_thresholds or THRESHOLDS, device=device,
    )
