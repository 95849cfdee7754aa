"""Degradation settings (pydantic) and the named presets.

`paper` is exactly what produced the released weights (METHOD.md section 3.2),
quirks included: the branch, resize and noise-type choices are drawn once per
group of 10 images, and sigma/beta ranges of 0.01-0.02 make the Gaussian
kernels deltas but the generalized/plateau kernels near box blurs over their
whole 7-21 px window. `realesrgan` is SeeSR's standard heavier second-order
setting (its params_realesrgan.yml).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KernelConfig(Strict):
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sigma_range: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = Field(0.1, ge=0, le=1)


class StageConfig(Strict):
    """One degradation order: resize, noise, JPEG."""

    resize_prob: tuple[float, float, float] = Field((0.2, 0.7, 0.1), description="up, down, keep")
    resize_up: tuple[float, float] = (1.0, 1.5)
    resize_down: tuple[float, float] = (0.15, 1.0)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = Field((1.0, 30.0), description="Gaussian sigma, in 1/255 units")
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)


class UGCConfig(Strict):
    """Extra LR degradations of short-form UGC video (`srmodel.degrade.ugc.apply_ugc`), each op with its own chance."""

    video_codec_prob: float = Field(0.5, ge=0, le=1, description="real H.264 (libx264) round trip")
    crf_range: tuple[int, int] = (23, 40)
    x264_presets: tuple[str, ...] = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium")
    chroma_prob: float = Field(0.3, ge=0, le=1, description="YCbCr chroma subsampling without a codec")
    chroma_factors: tuple[int, ...] = (2, 4)
    chroma_factor_prob: tuple[float, ...] = (0.75, 0.25)
    rescale_chain_prob: float = Field(0.3, ge=0, le=1, description="repeated down/up transcoding resizes")
    rescale_steps: tuple[int, int] = (2, 3)
    rescale_range: tuple[float, float] = (0.5, 1.0)
    rescale_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    oversharpen_prob: float = Field(0.2, ge=0, le=1, description="strong unsharp mask with halos")
    oversharpen_amount: tuple[float, float] = (1.0, 3.0)
    oversharpen_radius: tuple[float, float] = Field((0.5, 2.0), description="Gaussian sigma in LR pixels")
    overlay_text_prob: float = Field(0.1, ge=0, le=1, description="LR-only caption/watermark (pair flagged)")
    text_length: tuple[int, int] = (3, 12)
    text_size: tuple[int, int] = Field((8, 20), description="text height in LR pixels")
    text_opacity: tuple[float, float] = (0.6, 1.0)
    brightness_contrast_prob: float = Field(0.3, ge=0, le=1, description="auto-exposure / filter tone shifts")
    brightness_range: tuple[float, float] = (-0.1, 0.1)
    contrast_range: tuple[float, float] = (0.8, 1.2)
    gamma_range: tuple[float, float] = Field((0.8, 1.25), description="sampled log-uniformly")


class DegradeConfig(Strict):
    name: str
    scale: int = Field(4, ge=1)
    clean_prob: float = Field(0.0, ge=0, le=1, description="share of the bicubic-only ('clean') branch")
    kernel1: KernelConfig = KernelConfig()
    kernel2: KernelConfig = KernelConfig(sigma_range=(0.2, 1.5))
    second_blur_prob: float = 0.8
    stage1: StageConfig = StageConfig()
    stage2: StageConfig = StageConfig(resize_prob=(0.3, 0.4, 0.3), resize_down=(0.3, 1.0), resize_up=(1.0, 1.2),
                                      noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5))
    final_sinc_prob: float = 0.8
    final_sinc_omega: tuple[float, float] = (math.pi / 3, math.pi)
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    choice_group: int = Field(1, ge=1, description="images sharing the branch/resize/noise-type draws (paper: 10)")
    usm_target: bool = Field(True, description="the GT target is USM-sharpened (radius 50, weight 0.5, threshold 10)")
    ugc: UGCConfig | None = Field(None, description="extra UGC degradations of the LR (None: off)")


LIGHT = StageConfig(
    resize_prob=(0.4, 0.4, 0.2), resize_up=(1.0, 1.05), resize_down=(0.95, 1.0), gaussian_noise_prob=0.03,
    noise_range=(0.01, 0.03), poisson_scale_range=(0.01, 0.1), gray_noise_prob=0.1, jpeg_range=(80, 100),
)
PAPER_KERNEL = KernelConfig(
    kernel_prob=(0.6, 0.2, 0.1, 0.05, 0.05, 0.0), sigma_range=(0.01, 0.02), betag_range=(0.01, 0.02),
    betap_range=(0.01, 0.02), sinc_prob=0.05,
)

PRESETS = {
    "paper": DegradeConfig(
        name="paper", clean_prob=0.5, kernel1=PAPER_KERNEL, kernel2=PAPER_KERNEL, second_blur_prob=0.1,
        stage1=LIGHT, stage2=LIGHT, final_sinc_prob=0.4, choice_group=10,
    ),
    "realesrgan": DegradeConfig(
        name="realesrgan",
        stage1=StageConfig(resize_up=(1.0, 1.5), resize_down=(0.3, 1.0), noise_range=(1.0, 15.0), jpeg_range=(60, 95)),
        stage2=StageConfig(resize_prob=(0.3, 0.4, 0.3), resize_up=(1.0, 1.2), resize_down=(0.6, 1.0),
                           noise_range=(1.0, 12.0), poisson_scale_range=(0.05, 2.5), jpeg_range=(60, 100)),
        second_blur_prob=0.5,
    ),
}

PRESETS["ugc"] = PRESETS["realesrgan"].model_copy(update={"name": "ugc", "ugc": UGCConfig()})


def get_degrade_preset(name: str) -> DegradeConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown degradation preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
