"""SemanticUNet: SD-2 UNet2DConditionModel + image cross-attention after every text cross-attention."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .image_attention import attach_image_attentions, match_token_width, run_down_block, run_mid_block, run_up_block
from .semantic_mixin import SemanticModelMixin


class SemanticUNet(SemanticModelMixin, UNet2DConditionModel):
    """The released `checkpoint-90000/unet` (1,102 tensors: SD-2's 686 + 416 image_attentions)."""

    _base_class = UNet2DConditionModel
    _class_names = ("UNet2DConditionModel", "SemanticUNet")

    def __init__(self, use_image_cross_attention: bool = True, **unet_config):
        super().__init__(**unet_config)
        self.register_to_config(use_image_cross_attention=True)
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            attach_image_attentions(block)

    def set_trainable(self) -> None:
        """Fine-tuning split of the release: only image_attentions train, SD-2 stays frozen."""
        for name, param in self.named_parameters():
            param.requires_grad_(".image_attentions." in name)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        image_encoder_hidden_states: torch.Tensor,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        # Upsampling must follow the skip sizes when the latent is not a multiple of 2^levels.
        factor = 2 ** (len(self.up_blocks) - 1)
        forward_upsample_size = any(s % factor for s in sample.shape[-2:])

        emb = self.time_embedding(self.get_time_embed(sample, timestep))
        text = encoder_hidden_states.to(sample.dtype)
        tokens = match_token_width(image_encoder_hidden_states, self.image_token_dim, sample.dtype)
        ckpt = self.is_gradient_checkpointing

        h = self.conv_in(sample)
        skips = (h,)
        for block in self.down_blocks:
            h, outs = run_down_block(block, h, emb, text, tokens, ckpt)
            skips += outs
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"expected {len(skips)} down residuals from the ControlNet, got {len(down_block_additional_residuals)}"
                )
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))

        h = run_mid_block(self.mid_block, h, emb, text, tokens, ckpt)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual

        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if (forward_upsample_size and i < len(self.up_blocks) - 1) else None
            h = run_up_block(block, h, block_skips, emb, text, tokens, size, ckpt)

        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        if not return_dict:
            return (h,)
        return UNet2DConditionOutput(sample=h)
