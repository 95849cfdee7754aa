"""srmodel: the SeeSR + SAM2.1 super-resolution model and its maths. No Ray in here.

Parts: SemanticUNet / SemanticControlNet (released checkpoint-90000 folders),
SemanticEncoder (SAM2.1 hiera-tiny tokens), TextConditioner + build_prompt,
denoise (DDPM loop, CFG, batched latent tiles), SemanticUpscaler (the SR
stage end to end), presets and the tiny random model for tests.
"""

from .colorfix import color_fix
from .config import ModelConfig, ModelSource, SamplerConfig, TilingConfig
from .controlnet import SemanticControlNet
from .errors import WeightsError
from .presets import PRESET_NAMES, get_preset
from .sampler import denoise
from .seeds import image_id_from_uri, seed_for
from .semantic_encoder import SemanticEncoder, widen_tokens
from .text import FixedTagger, TextConditioner, build_prompt
from .tiny import ensure_tiny_model
from .unet import SemanticUNet
from .upscaler import SemanticUpscaler, SRRequest

__all__ = [
    "PRESET_NAMES",
    "FixedTagger",
    "ModelConfig",
    "ModelSource",
    "SRRequest",
    "SamplerConfig",
    "SemanticControlNet",
    "SemanticEncoder",
    "SemanticUNet",
    "SemanticUpscaler",
    "TextConditioner",
    "TilingConfig",
    "WeightsError",
    "build_prompt",
    "color_fix",
    "denoise",
    "ensure_tiny_model",
    "get_preset",
    "image_id_from_uri",
    "seed_for",
    "widen_tokens",
]
