"""VAE encode/decode: the release's rule (untiled, or its GroupNorm-sharing tiles above a size) or
diffusers' tiled mode (the exact-size path), both with bounded memory for large images."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .groupnorm_tiles import DECODER_PAD, ENCODER_PAD, needs_tiling, tiled_forward


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
def encode_posterior(vae: AutoencoderKL, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> scaled latents sampled from the posterior with the given N(0, I) noise."""
    dist = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
    return (dist.mean.float() + dist.std.float() * noise.to(dist.mean.device, torch.float32)) * vae.config.scaling_factor


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, generators=None) -> torch.Tensor:
    """Images in [0, 1] -> scaled latents sampled from the posterior (one generator per image, or the global RNG)."""
    dist = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
    if generators is None:
        noise = torch.randn(dist.mean.shape)
    else:
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g, device=g.device) for g in generators])
    return (dist.mean + dist.std * noise.to(dist.mean)).float() * vae.config.scaling_factor


@torch.no_grad()
def decode_release(vae: AutoencoderKL, latents: torch.Tensor, tile: int = 224) -> torch.Tensor:
    """As released: the plain decoder up to a longest latent side of tile + 22, its tiled hook above.

    Latents are not yet divided by the scaling factor; returns images in [0, 1], float32.
    """
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    if needs_tiling(z.shape[-2], z.shape[-1], tile, DECODER_PAD):
        x = tiled_forward(vae.decoder, z, tile, DECODER_PAD, is_decoder=True)
    else:
        x = vae.decoder(z)
    return (x.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_release(vae: AutoencoderKL, images: torch.Tensor, posterior_noise: torch.Tensor, tile: int = 1024) -> torch.Tensor:
    """As released: the plain encoder up to a longest side of tile + 64 px, its tiled hook above.

    images (1, 3, H, W) in [0, 1]; `posterior_noise` samples the latent distribution (the release
    drew it from the global RNG). Returns scaled latents, float32.
    """
    x = (images * 2 - 1).to(vae.dtype)
    if needs_tiling(x.shape[-2], x.shape[-1], tile, ENCODER_PAD):
        h = tiled_forward(vae.encoder, x, tile, ENCODER_PAD, is_decoder=False).to(vae.dtype)
    else:
        h = vae.encoder(x)
    if vae.quant_conv is not None:
        h = vae.quant_conv(h)
    mean, logvar = h.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
    return (mean + std * posterior_noise.to(mean)) * vae.config.scaling_factor
