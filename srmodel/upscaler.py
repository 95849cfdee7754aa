"""The diffusion SR stage: ControlNet + UNet + VAE + text encoder, batched over images and tiles.

`SemanticUpscaler.upscale` takes decoded RGB images with their SAM2 tokens,
prompts and seeds, and returns SR images of exactly (W*s, H*s). The image path
around the model (`config.geometry`: the release's or exact-size, see
image_paths.py) prepares each condition image and finishes each output; the
latent tiles of all images in a call share forwards by tile shape.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .models import vae as vae_ops
from .config import ModelConfig, SamplerConfig
from .errors import TimeBudgetExceeded
from .models.controlnet import SemanticControlNet
from .sampling.ddpm import make_scheduler
from .imaging.image_paths import image_path, round_to_uint8, to_tensor
from .sampling.noise import NoiseStream
from .sampling.denoise import denoise
from .models.text_encoder import TextConditioner
from .models.unet import SemanticUNet

__all__ = ["SRRequest", "SemanticUpscaler", "to_tensor", "to_uint8"]


@dataclass
class SRRequest:
    """One image for the SR stage."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    tokens: torch.Tensor  # (N, 256) or (N, 512) SAM2 tokens
    prompt: str  # the full positive prompt (see text.build_prompt)
    seed: int
    # Optional [z_T, noise_0, ..., noise_{T-1}], each (1, 4, h, w) on the latent grid of the working
    # size, used instead of the seed's draws (the release draws z_T, then one tensor per step).
    noise: Sequence[torch.Tensor] | None = None


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return round_to_uint8(x)


class SemanticUpscaler:
    def __init__(self, unet, controlnet, vae, text: TextConditioner, config: ModelConfig, device="cpu"):
        self.unet, self.controlnet, self.vae, self.text = unet, controlnet, vae, text
        self.config = config
        self.device = torch.device(device)
        self.scheduler_folder = None

    @classmethod
    def from_config(cls, config: ModelConfig, *, device="cpu") -> "SemanticUpscaler":
        source = config.source
        if source is None:
            raise ValueError(f"preset {config.name!r} has no model source; pass the released weights' folders")
        dtype = config.torch_dtype
        unet = SemanticUNet.from_pretrained(source.seesr, subfolder="unet", torch_dtype=dtype, device=device, fold_kv=config.fold_kv)
        controlnet = SemanticControlNet.from_pretrained(
            source.seesr, subfolder="controlnet", torch_dtype=dtype, device=device, fold_kv=config.fold_kv
        )
        vae = vae_ops.load_vae(source.sd_base, torch_dtype=dtype, device=device, tile_px=config.tiling.vae_tile)
        text = TextConditioner.from_pretrained(source.sd_base, torch_dtype=dtype, device=device)
        model = cls(unet, controlnet, vae, text, config, device)
        model.scheduler_folder = source.sd_base
        return model

    @property
    def sampler(self) -> SamplerConfig:
        return self.config.sampler

    @property
    def path(self):
        s = self.sampler
        return image_path(self.config.geometry, s.upscale, s.process_size, self.config.tiling.pad_multiple)

    def plan(self, width: int, height: int):
        """The sizes of one input through the image path (`.model_size`, `.out_size`, ...)."""
        return self.path.plan(width, height)

    def upscale(self, requests: Sequence[SRRequest], deadline: float | None = None) -> list[np.ndarray]:
        """SR images (uint8 RGB, exactly W*s x H*s) in the order given.

        Images are denoised together in groups of at most max_batch // (2 with CFG) images; their
        latent tiles share forwards whenever tile shapes agree, whatever the image sizes.
        `deadline` (time.monotonic()): past it, TimeBudgetExceeded is raised between denoising steps.
        """

        def check() -> None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeBudgetExceeded("denoising went past its time budget")

        out: list[np.ndarray] = []
        per_call = max(1, self.config.tiling.rows // (2 if self.sampler.cfg else 1))
        for start in range(0, len(requests), per_call):
            prepared = self.denoise(requests[start : start + per_call], check=check)
            check()
            out += [self.finish(p) for p in prepared]
        return out

    def denoise(self, requests: Sequence[SRRequest], check=None) -> list["Denoised"]:
        """Condition images and final latents (not divided by the VAE scaling factor) of requests."""
        s, dev, tiling, path = self.sampler, self.device, self.config.tiling, self.path
        plans = [path.plan(r.image.shape[1], r.image.shape[0]) for r in requests]
        controls, references = zip(*(path.condition(r.image, p) for r, p in zip(requests, plans)))
        controls = [c.to(dev) for c in controls]
        streams = [NoiseStream(seed=r.seed, given=r.noise) for r in requests]

        scheduler = make_scheduler(self.scheduler_folder)
        scheduler.set_timesteps(s.steps)
        latents = []
        for control, plan, stream in zip(controls, plans, streams):
            w, h = plan.model_size
            z_t = stream.next((4, h // 8, w // 8)).to(dev)
            if s.start_point == "lr":  # the release's "LRE": the LR latent noised to start_steps
                posterior = stream.draw_from_generator((1, 4, h // 8, w // 8))
                clean = self._encode(control, posterior)
                z_t = scheduler.add_noise(clean, z_t[None], torch.tensor([s.start_steps]))[0]
            latents.append(z_t.float())
        if s.start_point == "lr":
            scheduler.timesteps = scheduler.timesteps[scheduler.timesteps <= s.start_steps]

        prompt_embeds = self.text.encode([r.prompt for r in requests])
        negative = self.text.encode([s.negative_prompt]) if s.cfg else None
        tokens = torch.stack([r.tokens for r in requests]).to(dev)
        latents = denoise(
            self.unet,
            self.controlnet,
            scheduler,
            latents,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            image_tokens=tokens,
            control_image=[c[0] for c in controls],
            guidance_scale=s.guidance_scale,
            cfg=s.cfg,
            conditioning_scale=s.conditioning_scale,
            noise=streams,
            tile_size=tiling.latent_tile,
            tile_overlap=tiling.latent_overlap,
            tiling_rule="release" if self.config.geometry == "release" else "exact-size",
            max_batch=tiling.rows,
            check=check,
        )
        return [Denoised(p, r, z) for p, r, z in zip(plans, references, latents)]

    def _encode(self, control: torch.Tensor, posterior_noise: torch.Tensor) -> torch.Tensor:
        if self.config.geometry == "release":
            return vae_ops.encode_release(self.vae, control, posterior_noise, tile=self.config.tiling.vae_encoder_tile)
        return vae_ops.encode_posterior(self.vae, control, posterior_noise)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, 4, h, w) latents -> (1, 3, 8h, 8w) image in [0, 1] by the configured VAE rule."""
        if self.config.geometry == "release":
            return vae_ops.decode_release(self.vae, latents, tile=self.config.tiling.vae_decoder_tile)
        return vae_ops.decode(self.vae, latents)

    def finish(self, item: "Denoised") -> np.ndarray:
        """Decode, colour-fix and resize one image to its output size (uint8 RGB)."""
        return self.path.finish(self.decode(item.latents[None]), item.reference, item.plan, self.sampler.color_fix)


@dataclass
class Denoised:
    """One image after the denoising loop: its size plan, colour-fix reference and final latents."""

    plan: object
    reference: object
    latents: torch.Tensor  # (4, h, w), float32
