"""The diffusion SR stage: ControlNet + UNet + VAE + text encoder, batched over images and tiles.

`SemanticUpscaler.upscale` takes decoded RGB images with their SAM2 tokens,
prompts and seeds, and returns SR images of exactly (W*s, H*s). Images whose
padded working sizes agree share one denoising batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import vae as vae_ops
from .colorfix import color_fix
from .config import ModelConfig, SamplerConfig
from .controlnet import SemanticControlNet
from .ddpm import make_scheduler
from .geometry import SizePlan, crop_to, plan_size, prepare_condition, resize_image
from .sampler import denoise
from .seeds import generator_for
from .text import TextConditioner
from .unet import SemanticUNet


@dataclass
class SRRequest:
    """One image for the SR stage."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    tokens: torch.Tensor  # (N, 256) or (N, 512) SAM2 tokens
    prompt: str  # the full positive prompt (see text.build_prompt)
    seed: int


def to_tensor(image: np.ndarray) -> torch.Tensor:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    return torch.from_numpy(np.array(image, order="C")).permute(2, 0, 1).float().div(255)[None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


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

    def plan(self, width: int, height: int) -> SizePlan:
        s = self.sampler
        return plan_size(width, height, s.upscale, s.process_size, multiple=self.config.tiling.pad_multiple)

    def upscale(self, requests: Sequence[SRRequest]) -> list[np.ndarray]:
        """SR images (uint8 RGB, exactly W*s x H*s) in the order given."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        plans = []
        for i, r in enumerate(requests):
            h, w = r.image.shape[:2]
            plans.append(self.plan(w, h))
            groups[plans[-1].padded_size].append(i)
        out: list[np.ndarray | None] = [None] * len(requests)
        per_batch = max(1, self.config.tiling.max_batch // (2 if self.sampler.cfg else 1))
        for indices in groups.values():
            for start in range(0, len(indices), per_batch):
                chunk = indices[start : start + per_batch]
                results = self._run_group([requests[i] for i in chunk], [plans[i] for i in chunk])
                for i, img in zip(chunk, results):
                    out[i] = img
        return out

    def _run_group(self, requests: Sequence[SRRequest], plans: Sequence[SizePlan]) -> list[np.ndarray]:
        s, dev = self.sampler, self.device
        padded, work = zip(*(prepare_condition(to_tensor(r.image), p) for r, p in zip(requests, plans)))
        control = torch.cat(padded).to(dev)
        wp, hp = plans[0].padded_size
        latent_shape = (4, hp // 8, wp // 8)
        generators = [generator_for(r.seed) for r in requests]

        scheduler = make_scheduler(self.scheduler_folder)
        scheduler.set_timesteps(s.steps)
        if s.start_point == "noise":
            latents = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(dev)
        else:  # the release's "LRE": start from the noised latent of the upsampled LR image
            clean = vae_ops.encode(self.vae, control, generators)
            noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(dev)
            latents = scheduler.add_noise(clean, noise, torch.tensor([s.start_steps]))
            scheduler.timesteps = scheduler.timesteps[scheduler.timesteps <= s.start_steps]

        prompt_embeds = self.text.encode([r.prompt for r in requests])
        negative = self.text.encode([s.negative_prompt]) if s.cfg else None
        tokens = torch.stack([r.tokens for r in requests]).to(dev)
        tiling = self.config.tiling
        latents = denoise(
            self.unet,
            self.controlnet,
            scheduler,
            latents.float(),
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            image_tokens=tokens,
            control_image=control,
            guidance_scale=s.guidance_scale,
            cfg=s.cfg,
            conditioning_scale=s.conditioning_scale,
            generators=generators,
            tile_size=tiling.latent_tile,
            tile_overlap=tiling.latent_overlap,
            max_batch=tiling.max_batch,
        )
        images = vae_ops.decode(self.vae, latents)
        results = []
        for k, plan in enumerate(plans):
            sr = crop_to(images[k : k + 1], plan.work_size)
            sr = color_fix(sr, work[k].to(sr), s.color_fix)
            sr = resize_image(sr, plan.out_size).clamp(0, 1)
            results.append(to_uint8(sr))
        return results
