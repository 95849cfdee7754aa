"""The training recipe (METHOD.md section 3.1 as defaults) as a pydantic config."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainRecipe(BaseModel):
    """Hyper-parameters of one optimizer step. Defaults are the authors' run unless noted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    init: Literal["released", "paper"] = Field(
        "released",
        description="released: unet/ and controlnet/ of the model source's checkpoint as they are (continue "
        "fine-tuning); paper: the authors' start, the public SeeSR checkpoint (`seesr_init`): SD-2-base UNet "
        "(sd_base/unet) + SeeSR's image_attentions, SeeSR's whole ControlNet",
    )
    seesr_init: str | None = Field(
        None, description="init=paper: the public SeeSR checkpoint folder or URI with unet/ and controlnet/ "
        "(the authors' preset/models/seesr)")
    batch_size: int = Field(1, ge=1, description="per worker, per micro-batch (authors: 1)")
    grad_accum: int = Field(2, ge=1, description="micro-batches per optimizer step (authors: 2)")
    lr: float = Field(5e-5, gt=0, description="constant after warm-up (authors: 5e-5, constant, no scaling)")
    lr_warmup_steps: int = Field(0, ge=0, description="linear warm-up (the authors' 500 was ignored by 'constant')")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    optimizer: Literal["auto", "adamw", "adamw8bit"] = Field(
        "auto",
        description="adamw8bit (bitsandbytes, CUDA only) as the authors; adamw = torch fp32 AdamW; "
        "auto = adamw8bit on CUDA when bitsandbytes is installed, else adamw",
    )
    grad_clip: float = Field(1.0, gt=0, description="max global grad norm over the trainable parameters")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto",
        description="autocast dtype; trainable weights stay fp32. auto = bf16 on CUDA (no loss scaling), "
        "no autocast on CPU. fp16 (with a GradScaler) is the authors' setting",
    )
    frozen_dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="dtype of the frozen parts (VAE, text encoder, SAM, frozen UNet): auto = the autocast dtype"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (authors: off)")
    null_text_ratio: float = Field(0.5, ge=0, le=1, description="share of samples trained with the empty prompt")
    seed: int = Field(0, description="all randomness (noise, t, null text, VAE sample) derives from it per sample")

    @model_validator(mode="after")
    def _paper_needs_seesr(self):
        if self.init == "paper" and not self.seesr_init:
            raise ValueError("init=paper starts where the authors did, from the public SeeSR checkpoint: give "
                             "seesr_init (--seesr-init FOLDER with SeeSR's unet/ and controlnet/, their "
                             "preset/models/seesr)")
        if self.init == "released" and self.seesr_init:
            raise ValueError("seesr_init is the start of init=paper; init=released continues from the model "
                             "source's checkpoint: drop one of them")
        return self

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        mp = self.mixed_precision
        if mp == "auto":
            mp = "bf16" if device.type == "cuda" else "no"
        return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]

    def frozen_torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.frozen_dtype == "auto":
            return self.autocast_dtype(device) or torch.float32
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.frozen_dtype]

    def optimizer_name(self, device: torch.device) -> str:
        if self.optimizer != "auto":
            return self.optimizer
        if device.type == "cuda":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                return "adamw"
            return "adamw8bit"
        return "adamw"
