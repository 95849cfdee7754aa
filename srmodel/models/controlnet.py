"""SemanticControlNet: SD-2 ControlNetModel whose down and mid blocks also attend to image tokens."""

from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from .image_attention import attach_image_attentions, match_token_width, run_down_block, run_mid_block
from .semantic_mixin import SemanticModelMixin


class SemanticControlNet(SemanticModelMixin, ControlNetModel):
    """The released `checkpoint-90000/controlnet` (SD-2 ControlNet keys + 182 image_attentions)."""

    _base_class = ControlNetModel
    _class_names = ("ControlNetModel", "SemanticControlNet")

    def __init__(self, use_image_cross_attention: bool = True, **controlnet_config):
        super().__init__(**controlnet_config)
        self.register_to_config(use_image_cross_attention=True)
        for block in [*self.down_blocks, self.mid_block]:
            attach_image_attentions(block)

    def set_trainable(self) -> None:
        """The release fine-tunes the whole ControlNet."""
        self.requires_grad_(True)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        image_encoder_hidden_states: torch.Tensor,
        conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        return_dict: bool = True,
    ):
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        # Same sinusoid (always float32, then cast) as the UNet's.
        emb = self.time_embedding(UNet2DConditionModel.get_time_embed(self, sample, timestep))
        text = encoder_hidden_states.to(sample.dtype)
        tokens = match_token_width(image_encoder_hidden_states, self.image_token_dim, sample.dtype)
        ckpt = self.is_gradient_checkpointing

        cond = self.controlnet_cond_embedding(controlnet_cond.to(sample.dtype))
        if cond.shape[-2:] != sample.shape[-2:]:
            raise ValueError(
                f"controlnet_cond must be 8x the latent size: latent {tuple(sample.shape[-2:])}, "
                f"condition image {tuple(controlnet_cond.shape[-2:])}"
            )
        h = self.conv_in(sample) + cond
        skips = (h,)
        for block in self.down_blocks:
            h, outs = run_down_block(block, h, emb, text, tokens, ckpt)
            skips += outs
        h = run_mid_block(self.mid_block, h, emb, text, tokens, ckpt)

        down = [proj(s) for proj, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if self.config.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        if not return_dict:
            return (down, mid)
        from diffusers.models.controlnets.controlnet import ControlNetOutput

        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)
