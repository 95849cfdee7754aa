"""The denoising loop: ControlNet -> UNet per step, CFG on text only, DDPM update.

Matches the authors' StableDiffusionControlNetPipeline.__call__ (CFG batch
order [uncond, cond]; SAM tokens and the condition image duplicated for both
halves; e = u + g*(c - u) after tile blending), with two changes that do not
alter results: several images (and all latent tiles of each) share forwards,
and each image's noise comes from its own stream so its pixels do not depend
on which images share its batch.

Images may have different latent sizes: tiles of the same shape, from any
image, share one forward (chunked to `max_batch` rows).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from .ddpm import ddpm_step
from .noise import NoiseStream
from .latent_tiles import Tile, TilingRule, blend_weights, plan_tiles


def _as_list(x: torch.Tensor | Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    """(B, C, H, W) tensor or a sequence of (C, H, W) / (1, C, H, W) tensors -> list of (C, H, W)."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"{what} must be (B, C, H, W), got shape {tuple(x.shape)}")
        return list(x)
    items = [t[0] if t.dim() == 4 and t.shape[0] == 1 else t for t in x]
    for t in items:
        if t.dim() != 3:
            raise ValueError(f"each of {what} must be (C, H, W), got shape {tuple(t.shape)}")
    return items


def _per_image(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t


@torch.no_grad()
def denoise(
    unet,
    controlnet,
    scheduler,
    latents: torch.Tensor | Sequence[torch.Tensor],
    *,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    image_tokens: torch.Tensor,
    control_image: torch.Tensor | Sequence[torch.Tensor],
    guidance_scale: float,
    cfg: bool,
    conditioning_scale: float = 1.0,
    check: Callable[[], None] | None = None,
    step_noise: Sequence[torch.Tensor] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    noise: Sequence[NoiseStream] | None = None,
    tile_size: int | None = None,
    tile_overlap: int = 32,
    tiling_rule: TilingRule = "exact-size",
    max_batch: int = 16,
) -> torch.Tensor | list[torch.Tensor]:
    """Run every timestep of `scheduler` (already `set_timesteps`) from `latents`.

    latents: (B,4,h,w), or one (4,h,w) tensor per image when sizes differ; they keep their dtype
    (float32 or float64), the models run in their own. `control_image` matches: (B,3,8h,8w) or one
    (3,8h,8w) per image, in [0,1]. Step noise comes from `step_noise` (one (B,...) tensor per step),
    else from per-image `noise` streams or `generators`. `tile_size`/`tile_overlap` (latent pixels)
    tile images under `tiling_rule`. `check()` is called before each step (it may raise, e.g. a time
    budget). Returns latents (not divided by the VAE scaling factor) in the
    form they came in.
    """
    stacked = isinstance(latents, torch.Tensor)
    xs = _as_list(latents, "latents")
    controls = _as_list(control_image, "control_image")
    batch = len(xs)
    if len(controls) != batch:
        raise ValueError(f"{len(controls)} control images for {batch} latents")
    for x, c in zip(xs, controls):
        if tuple(c.shape[-2:]) != (x.shape[-2] * 8, x.shape[-1] * 8):
            raise ValueError(
                f"control_image must be 8x the latent size {tuple(x.shape[-2:])}, got {tuple(c.shape[-2:])}"
            )
    if cfg and negative_prompt_embeds is None:
        raise ValueError("cfg=True needs negative_prompt_embeds")
    timesteps = scheduler.timesteps
    if step_noise is not None and len(step_noise) < len(timesteps):
        raise ValueError(f"step_noise has {len(step_noise)} tensors for {len(timesteps)} steps")
    if generators is not None:
        if len(generators) != batch:
            raise ValueError(f"{len(generators)} generators for a batch of {batch}")
        noise = [NoiseStream(generator=g) for g in generators]
    if noise is not None and len(noise) != batch:
        raise ValueError(f"{len(noise)} noise streams for a batch of {batch}")

    model_dtype = unet.dtype
    branches = {"cond": _per_image(prompt_embeds, batch).to(model_dtype)}
    if cfg:
        branches = {"uncond": _per_image(negative_prompt_embeds, batch).to(model_dtype), **branches}
    tokens = _per_image(image_tokens, batch)
    controls = [c.to(controlnet.dtype) for c in controls]

    tiles: list[Tile] = []
    weights: list[torch.Tensor] = []
    for b, x in enumerate(xs):
        grid = plan_tiles(x.shape[-2], x.shape[-1], tile_size, tile_overlap, tiling_rule, image=b)
        tiles += grid
        weights += blend_weights(x.shape[-2], x.shape[-1], grid, rule=tiling_rule)
    # [uncond, cond] per tile; rows of one tile shape share forwards, in order of first appearance.
    by_shape: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)
    for i, k in enumerate(tiles):
        by_shape[(k.h, k.w)] += [(branch, i) for branch in branches]
    chunks = [rows[s : s + max_batch] for rows in by_shape.values() for s in range(0, len(rows), max_batch)]

    for step, t in enumerate(timesteps):
        if check is not None:
            check()  # may raise (a time budget): between steps, never mid-forward
        eps = {branch: [torch.zeros_like(x) for x in xs] for branch in branches}
        for chunk in chunks:
            sel = [tiles[i] for _, i in chunk]
            x_in = torch.stack([xs[k.image][:, k.y : k.y + k.h, k.x : k.x + k.w] for k in sel]).to(model_dtype)
            text = torch.stack([branches[b][tiles[i].image] for b, i in chunk])
            toks = torch.stack([tokens[k.image] for k in sel])
            cond = torch.stack(
                [controls[k.image][:, 8 * k.y : 8 * (k.y + k.h), 8 * k.x : 8 * (k.x + k.w)] for k in sel]
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
            )[0]
            for (branch, i), e in zip(chunk, out):
                k = tiles[i]
                region = eps[branch][k.image][:, k.y : k.y + k.h, k.x : k.x + k.w]
                e = e.to(region.dtype)
                region += e * weights[i].to(e)
        for b, x in enumerate(xs):
            e = eps["cond"][b]
            if cfg:
                u = eps["uncond"][b]
                e = u + guidance_scale * (e - u)
            if step_noise is not None:
                z = step_noise[step][b]
            elif noise is not None and int(t) > 0:
                z = noise[b].next(x.shape)
            elif int(t) > 0:
                z = torch.randn(x.shape, dtype=torch.float32)
            else:
                z = None
            xs[b] = ddpm_step(scheduler, e, t, x, z)
    return torch.stack(xs) if stacked else xs
