"""The denoising loop: ControlNet -> UNet per step, CFG on text only, DDPM update.

Matches the authors' StableDiffusionControlNetPipeline.__call__ (CFG batch
order [uncond, cond]; SAM tokens and the condition image duplicated for both
halves; e = u + g*(c - u)), with two changes that do not alter results:
several images (and all latent tiles of each) share one forward, and each
image's noise comes from its own generator so its pixels do not depend on
which images share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ddpm import ddpm_step
from .tiling import Tile, blend_weights, tile_grid


def _draw_noise(x: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    if generators is None:
        return torch.randn(x.shape, dtype=torch.float32).to(x)
    # Drawn on the generator's device (CPU by default) so a seed gives the same noise on any accelerator.
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, dtype=torch.float32, device=g.device) for g in generators]
    ).to(x)


def _plan_tiles(batch: int, height: int, width: int, tile: int | None, overlap: int):
    tiles: list[Tile] = []
    weights: list[torch.Tensor] = []
    for b in range(batch):
        if tile is None or (height <= tile and width <= tile):
            grid = [Tile(b, 0, 0, height, width)]
        else:
            grid = tile_grid(height, width, tile, overlap, image=b)
        tiles += grid
        weights += blend_weights(height, width, grid)
    return tiles, weights


@torch.no_grad()
def denoise(
    unet,
    controlnet,
    scheduler,
    latents: torch.Tensor,
    *,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    image_tokens: torch.Tensor,
    control_image: torch.Tensor,
    guidance_scale: float,
    cfg: bool,
    conditioning_scale: float = 1.0,
    step_noise: Sequence[torch.Tensor] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    tile_size: int | None = None,
    tile_overlap: int = 32,
    max_batch: int = 16,
) -> torch.Tensor:
    """Run every timestep of `scheduler` (already `set_timesteps`) from `latents`.

    latents (B,4,h,w) keep their dtype through the loop (float32 or float64);
    the models run in their own dtype. `control_image` is (B,3,8h,8w) in [0,1].
    `tile_size`/`tile_overlap` (latent pixels) tile images larger than a tile.
    Returns latents not divided by the VAE scaling factor.
    """
    batch, _, height, width = latents.shape
    if cfg and negative_prompt_embeds is None:
        raise ValueError("cfg=True needs negative_prompt_embeds")
    if control_image.shape[-2:] != (height * 8, width * 8):
        raise ValueError(
            f"control_image must be 8x the latent size {(height, width)}, got {tuple(control_image.shape[-2:])}"
        )
    timesteps = scheduler.timesteps
    if step_noise is not None and len(step_noise) < len(timesteps):
        raise ValueError(f"step_noise has {len(step_noise)} tensors for {len(timesteps)} steps")
    if generators is not None and len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for a batch of {batch}")

    def per_image(t: torch.Tensor) -> torch.Tensor:
        return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t

    model_dtype = unet.dtype
    branches = {"cond": per_image(prompt_embeds).to(model_dtype)}
    if cfg:
        branches = {"uncond": per_image(negative_prompt_embeds).to(model_dtype), **branches}
    tokens = per_image(image_tokens)
    control = control_image.to(controlnet.dtype)
    tiles, weights = _plan_tiles(batch, height, width, tile_size, tile_overlap)
    rows = [(branch, i) for i in range(len(tiles)) for branch in branches]  # [uncond, cond] per tile

    x = latents
    for step, t in enumerate(timesteps):
        eps = {branch: torch.zeros_like(x) for branch in branches}
        for start in range(0, len(rows), max_batch):
            chunk = rows[start : start + max_batch]
            sel = [tiles[i] for _, i in chunk]
            x_in = torch.stack([x[k.image, :, k.y : k.y + k.h, k.x : k.x + k.w] for k in sel]).to(model_dtype)
            text = torch.stack([branches[b][tiles[i].image] for b, i in chunk])
            toks = torch.stack([tokens[k.image] for k in sel])
            cond = torch.stack(
                [control[k.image, :, 8 * k.y : 8 * (k.y + k.h), 8 * k.x : 8 * (k.x + k.w)] for k in sel]
            )
            down, mid = controlnet(
                x_in,
                t,
                encoder_hidden_states=text,
                controlnet_cond=cond,
                image_encoder_hidden_states=toks,
                conditioning_scale=conditioning_scale,
                return_dict=False,
            )
            out = unet(
                x_in,
                t,
                encoder_hidden_states=text,
                image_encoder_hidden_states=toks,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0].to(x.dtype)
            for (branch, i), e in zip(chunk, out):
                k = tiles[i]
                region = eps[branch][k.image, :, k.y : k.y + k.h, k.x : k.x + k.w]
                region += e * weights[i].to(e)
        if cfg:
            u, c = eps["uncond"], eps["cond"]
            e = u + guidance_scale * (c - u)
        else:
            e = eps["cond"]
        noise = step_noise[step] if step_noise is not None else (_draw_noise(x, generators) if int(t) > 0 else None)
        x = ddpm_step(scheduler, e, t, x, noise)
    return x
