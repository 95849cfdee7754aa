"""pydantic configs of the model side: where weights live, how to sample, how to tile."""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

WILD_ADDED_PROMPT = "clean, high-resolution, 8k, ultra-detailed, ultra-realistic"
SYNTHETIC_ADDED_PROMPT = "clean, high-resolution, 8k"
NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"
DEFAULT_MAX_BATCH = 16  # UNet rows per forward where no GPU memory is known (CPU)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(Strict):
    """Where the released parts are: local paths or any fsspec URI (`s3://bucket/weights/checkpoint-90000`).

    Remote parts are staged once per node into a local cache before loading (`actors/staging.py`); the
    model code itself only ever opens local files.
    """

    sd_base: str = Field(description="stable-diffusion-2-base folder: vae/ text_encoder/ tokenizer/ scheduler/")
    seesr: str = Field(description="released checkpoint-90000 folder: unet/ controlnet/")
    sam2_checkpoint: str = Field(description="sam2.1_hiera_tiny.pt")
    sam2_config: str = "configs/sam2.1/sam2.1_hiera_t.yaml"
    ram: str | None = Field(None, description="ram_swin_large_14m.pth (tagger)")
    dape: str | None = Field(None, description="DAPE.pth (tagger LoRA)")
    ram_config: Literal["swin_l", "tiny"] = Field("swin_l", description="tagger architecture (tiny: tests only)")
    ram_tag_list: str | None = Field(None, description="default: the shipped ram_tag_list.txt")
    ram_thresholds: str | None = Field(None, description="default: the shipped ram_tag_list_threshold.txt")
    revision: str = Field("checkpoint-90000", description="recorded in outputs; part of the params hash")
    sha256: dict[str, str] | None = Field(
        None, description="pins for weights staged from object storage: {file URI: hex sha256}, every staged file "
                          "listed (`ugcsr upscale --weights-sha256 SUMS`, sha256sum output relative to WEIGHTS)")

    # Fields that name files or folders (the rest are options): what gets staged from object storage.
    PATH_FIELDS: ClassVar[tuple[str, ...]] = (
        "sd_base", "seesr", "sam2_checkpoint", "sam2_config", "ram", "dape", "ram_tag_list", "ram_thresholds")

    def paths(self) -> dict[str, str]:
        """{field: path or URI} of every file or folder this source names."""
        return {f: getattr(self, f) for f in self.PATH_FIELDS if getattr(self, f)}


class SamplerConfig(Strict):
    steps: int = Field(50, ge=1, le=1000)
    cfg: bool = True
    guidance_scale: float = 8.5
    user_prompt: str = ""
    added_prompt: str = WILD_ADDED_PROMPT
    added_prompt_first: bool = Field(
        False, description="put the added prompt before the tags so 77-token truncation cannot drop it (not as released)"
    )
    prompt_source: Literal["tagger", "fixed"] = Field(
        "tagger", description="tagger: RAM+DAPE tags per image; fixed: `fixed_tags` for every image (no RAM weights)"
    )
    fixed_tags: str = ""
    negative_prompt: str = NEGATIVE_PROMPT
    start_point: Literal["noise", "lr"] = "noise"
    start_steps: int = Field(999, ge=0, le=999, description="timestep the LR latent is noised to (start_point=lr)")
    conditioning_scale: float = 1.0
    color_fix: Literal["adain", "wavelet", "none"] = "adain"
    upscale: int = Field(4, ge=1, le=16)
    process_size: int = Field(512, ge=8, description="minimum short side of the working image, as released")

    @model_validator(mode="after")
    def _check_cfg(self):
        if self.cfg and self.guidance_scale <= 1.0:
            raise ValueError(
                f"cfg=true with guidance_scale={self.guidance_scale}: the release disables CFG at scale <= 1 "
                "(its 'gs 0.9' means no CFG); set cfg=false instead"
            )
        return self


class TilingConfig(Strict):
    latent_tile: int = Field(96, ge=8, description="latent tile side (96 = 768 px, as released)")
    latent_overlap: int = Field(32, ge=0)
    vae_tile: int = Field(1024, ge=64, description="exact-size path: diffusers' VAE tile side in image pixels")
    vae_decoder_tile: int = Field(
        224, ge=8, description="release path: decoder tile in latent pixels (untiled up to tile + 22, as released)"
    )
    vae_encoder_tile: int = Field(
        1024, ge=64, description="release path: encoder tile in image pixels (start_point=lr; untiled up to tile + 64)"
    )
    max_batch: int | None = Field(
        None, ge=1,
        description="most latent tiles x CFG branches in one UNet forward; None: the largest the GPU's memory holds "
        "(srmodel/sampling/memory_model.py), 16 on CPU; a number set here always wins",
    )
    pad_multiple: int = Field(
        64, ge=8, multiple_of=8,
        description="exact-size path: working images are padded up to this multiple (then cropped)",
    )

    @property
    def rows(self) -> int:
        """max_batch, or the CPU default when it is left to the memory model and nothing resolved it."""
        return self.max_batch or DEFAULT_MAX_BATCH

    @model_validator(mode="after")
    def _check(self):
        if self.latent_overlap >= self.latent_tile:
            raise ValueError(f"latent_overlap ({self.latent_overlap}) must be smaller than latent_tile ({self.latent_tile})")
        return self


class ModelConfig(Strict):
    """Everything the model side needs: a preset is one of these."""

    name: str
    source: ModelSource | None = Field(None, description="None only for the tiny preset (built on demand)")
    sampler: SamplerConfig = SamplerConfig()
    tiling: TilingConfig = TilingConfig()
    geometry: Literal["release", "exact-size"] = Field(
        "release",
        description="image path around the model: the authors' resizes, stretch, tiling and rounding (release), "
        "or exact aspect with pad-and-crop (exact-size); see docs/model.md",
    )
    dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    fold_kv: bool = Field(True, description="fold the 512-wide image K/V to 256 at load (identical results)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def params_hash(self) -> str:
        """Hash of every setting that changes output pixels (model revision included)."""
        pixel = {
            "sampler": self.sampler.model_dump(),
            "tiling": self.tiling.model_dump(exclude={"max_batch"}),  # batching does not change pixels
            "dtype": self.dtype,
            "geometry": self.geometry,
            "revision": self.source.revision if self.source else "tiny",
            "model": self.name if self.source is None else None,
        }
        return hashlib.sha256(json.dumps(pixel, sort_keys=True).encode()).hexdigest()[:16]
