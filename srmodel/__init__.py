"""srmodel: the SeeSR + SAM2.1 super-resolution model and its maths. No Ray in here.

Parts (docs/architecture.md draws them):
  models/    SemanticUNet, SemanticControlNet (released checkpoint-90000 folders), VAE, text encoder, strict loading
  semantic/  SemanticEncoder: SAM 2.1 hiera-tiny tokens
  ram/       the RAM + DAPE tagger (the tag prompts)
  sampling/  DDPM, the denoising loop (CFG, batched latent tiles), noise and seeds
  imaging/   the release and exact-size image paths, size planning, colour fix
  metrics/   the challenge's PSNR/SSIM/Score, LPIPS and no-reference metrics
  degrade/   the training pairs' degradation model
  train/     the fine-tuning recipe (loss, trainable split, optimizer step)
Top level: SemanticUpscaler (upscaler.py, the SR stage end to end), configs and presets, the builder of
the stages' models (stages.py), prompts, errors, and the tiny random model for tests (tiny.py).

Names are imported on first use: a stage that needs only the SAM2 encoder does
not pay for importing diffusers and transformers (seconds per actor start).
"""

from importlib import import_module

_EXPORTS = {
    "color_fix": "imaging.colorfix",
    "ModelConfig": "config",
    "ModelSource": "config",
    "SamplerConfig": "config",
    "TilingConfig": "config",
    "SemanticControlNet": "models.controlnet",
    "WeightsError": "errors",
    "PRESET_NAMES": "presets",
    "get_preset": "presets",
    "denoise": "sampling.denoise",
    "image_id_from_uri": "sampling.seeds",
    "seed_for": "sampling.seeds",
    "SemanticEncoder": "semantic.sam2_encoder",
    "widen_tokens": "semantic.sam2_encoder",
    "FixedTagger": "prompts",
    "TextConditioner": "models.text_encoder",
    "build_prompt": "prompts",
    "ensure_tiny_model": "tiny",
    "SemanticUNet": "models.unet",
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
