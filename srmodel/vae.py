"""VAE encode/decode with diffusers' tiled mode for large images (bounded memory)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL


def load_vae(sd_folder: str | Path, *, torch_dtype=torch.float32, device="cpu", tile_px: int = 1024) -> AutoencoderKL:
    vae = AutoencoderKL.from_pretrained(Path(sd_folder) / "vae", torch_dtype=torch_dtype).to(device).eval()
    vae.requires_grad_(False)
    configure_tiling(vae, tile_px)
    return vae


def configure_tiling(vae: AutoencoderKL, tile_px: int) -> None:
    """Tile encode and decode above `tile_px` pixels (diffusers blends 25% overlaps).

    The release used a GroupNorm-aggregating tiled VAE (multidiffusion's VAEHook);
    we keep diffusers' maintained implementation instead: its per-tile norms can
    shift colour slightly across tiles, which the overlap blend hides.
    """
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // factor
    vae.tile_overlap_factor = 0.25


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Latents (not yet divided by the scaling factor) -> images in [0, 1], float32."""
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (x.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, generators=None) -> torch.Tensor:
    """Images in [0, 1] -> scaled latents sampled from the posterior (per-image generators)."""
    dist = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
    if generators is None:
        z = dist.sample()
    else:
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g, device=g.device) for g in generators])
        z = dist.mean + dist.std * noise.to(dist.mean)
    return z.float() * vae.config.scaling_factor
