"""The semantic cross-attention ("image_attentions") added to diffusers' SD blocks.

The released model (SeeSR, reused unchanged by the SAM2 variant) puts a second
full Transformer2DModel after every text cross-attention; its cross-attention
reads the image tokens (K/V input width 512). Here the extra modules are
attached to diffusers' own blocks under the released key names, and the block
forwards below run `resnet -> attentions[i] -> image_attentions[i]` per layer.
We drive the blocks' sub-modules directly rather than patching diffusers'
block forwards so that the order of operations is stated in one place.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn
from torch.utils.checkpoint import checkpoint

IMAGE_TOKEN_DIM = 512  # hard-coded in the released code, not a config key


def attach_image_attentions(block: nn.Module, token_dim: int = IMAGE_TOKEN_DIM) -> None:
    """Give a cross-attention block one image Transformer2D per text Transformer2D."""
    if not hasattr(block, "attentions"):
        return
    modules = []
    for text_attn in block.attentions:
        cfg = dict(text_attn.config)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        cfg["cross_attention_dim"] = token_dim
        modules.append(Transformer2DModel(**cfg))
    block.image_attentions = nn.ModuleList(modules)


def image_attention_modules(model: nn.Module):
    return [m for name, m in model.named_modules() if name.split(".")[-2:-1] == ["image_attentions"]]


def fold_image_kv(model: nn.Module) -> None:
    """Fold K/V weights for duplicated tokens: W·[f; f] = (W[:, :d] + W[:, d:])·f.

    Halves the K/V input width (and the tokens shipped between stages) with
    identical results for tokens built by duplication, as the SAM2 tokens are.
    """
    for module in image_attention_modules(model):
        for block in module.transformer_blocks:
            attn = block.attn2
            for name in ("to_k", "to_v"):
                old: nn.Linear = getattr(attn, name)
                half = old.in_features // 2
                new = nn.Linear(half, old.out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
                with torch.no_grad():
                    new.weight.copy_(old.weight[:, :half] + old.weight[:, half:])
                    if old.bias is not None:
                        new.bias.copy_(old.bias)
                new.weight.requires_grad_(old.weight.requires_grad)
                setattr(attn, name, new)


def _maybe_ckpt(enabled: bool, fn, *args):
    # Transformer2DModel checkpoints itself once enable_gradient_checkpointing()
    # has run; the ResNets are ours to wrap because we drive them directly.
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _attend(text_attn, image_attn, h, text, tokens):
    h = text_attn(h, encoder_hidden_states=text, return_dict=False)[0]
    return image_attn(h, encoder_hidden_states=tokens, return_dict=False)[0]


def run_down_block(block, h, temb, text, tokens, grad_ckpt=False):
    """One down block; returns the hidden state and its skip outputs."""
    outputs = ()
    attentions = getattr(block, "attentions", None)
    for i, resnet in enumerate(block.resnets):
        h = _maybe_ckpt(grad_ckpt, resnet, h, temb)
        if attentions is not None:
            h = _attend(attentions[i], block.image_attentions[i], h, text, tokens)
        outputs += (h,)
    for down in block.downsamplers or ():
        h = down(h)
        outputs += (h,)
    return h, outputs


def run_mid_block(block, h, temb, text, tokens, grad_ckpt=False):
    h = _maybe_ckpt(grad_ckpt, block.resnets[0], h, temb)
    for i, resnet in enumerate(block.resnets[1:]):
        h = _attend(block.attentions[i], block.image_attentions[i], h, text, tokens)
        h = _maybe_ckpt(grad_ckpt, resnet, h, temb)
    return h


def run_up_block(block, h, skips, temb, text, tokens, upsample_size=None, grad_ckpt=False):
    """One up block; `skips` are consumed from the end, as in diffusers."""
    attentions = getattr(block, "attentions", None)
    for i, resnet in enumerate(block.resnets):
        h = torch.cat([h, skips[-1]], dim=1)
        skips = skips[:-1]
        h = _maybe_ckpt(grad_ckpt, resnet, h, temb)
        if attentions is not None:
            h = _attend(attentions[i], block.image_attentions[i], h, text, tokens)
    for up in block.upsamplers or ():
        h = up(h, upsample_size)
    return h


def match_token_width(tokens: torch.Tensor, expected: int, dtype: torch.dtype) -> torch.Tensor:
    """Accept tokens at the model's K/V width, or half of it (then duplicated, as released)."""
    if tokens.ndim != 3:
        raise ValueError(f"image_encoder_hidden_states must be (batch, tokens, width), got shape {tuple(tokens.shape)}")
    width = tokens.shape[-1]
    if width * 2 == expected:
        tokens = torch.cat([tokens, tokens], dim=-1)
    elif width != expected:
        raise ValueError(
            f"image_encoder_hidden_states have width {width}; this model takes {expected}"
            + (f" (or {expected // 2}, duplicated)" if expected % 2 == 0 else "")
            + ". Folded models take the 256-wide SAM2 tokens only."
        )
    return tokens.to(dtype)
