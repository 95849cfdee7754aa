"""srmodel: the SeeSR + SAM2.1 super-resolution model and its maths. No Ray in here.

Parts: SemanticUNet / SemanticControlNet (released checkpoint-90000 folders),
SemanticEncoder (SAM2.1 hiera-tiny tokens), TextConditioner + build_prompt,
denoise (DDPM loop, CFG, batched latent tiles), SemanticUpscaler (the SR
stage end to end), presets and the tiny random model for tests.

Names are imported on first use: a stage that needs only the SAM2 encoder does
not pay for importing diffusers and transformers (seconds per actor start).
"""

from importlib import import_module

_EXPORTS = {
    "color_fix": "colorfix",
    "ModelConfig": "config",
    "ModelSource": "config",
    "SamplerConfig": "config",
    "TilingConfig": "config",
    "SemanticControlNet": "controlnet",
    "WeightsError": "errors",
    "PRESET_NAMES": "presets",
    "get_preset": "presets",
    "denoise": "sampler",
    "image_id_from_uri": "seeds",
    "seed_for": "seeds",
    "SemanticEncoder": "semantic_encoder",
    "widen_tokens": "semantic_encoder",
    "FixedTagger": "prompts",
    "TextConditioner": "text",
    "build_prompt": "prompts",
    "ensure_tiny_model": "tiny",
    "SemanticUNet": "unet",
    "SemanticUpscaler": "upscaler",
    "SRRequest": "upscaler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'srmodel' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
