"""What happens to an image before and after the diffusion model: two named paths.

``release`` (default of the paper presets) reproduces the authors' test_seesr_sam.py: PIL bicubic
resizes on uint8 (a cascade to process_size//s when a side is short, then x s, then a stretch to a
multiple of 8), the model at that size, the decoded image rounded to uint8, the colour fix against
the resized condition image with torchvision's truncating `ToPILImage`, and a final PIL resize back
to (W*s, H*s).

``exact-size`` (ours) keeps the aspect ratio exact: integer size arithmetic, one float bicubic
resize, reflect padding to a multiple (so images of similar sizes share batches) cropped away
after decoding, the colour fix in float and one rounding at the end.

Both give exactly (W*s, H*s) outputs. `docs/model.md` lists what differs and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from .colorfix import color_fix
from .sizes import SizePlan, crop_to, plan_size, prepare_condition, resize_image

Geometry = Literal["release", "exact-size"]
GEOMETRIES = ("release", "exact-size")
Size = tuple[int, int]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1] (as torchvision's ToTensor: x / 255)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    return torch.from_numpy(np.array(image, order="C")).permute(2, 0, 1).float().div(255)[None]


def round_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint8, rounding half to even (diffusers' postprocess)."""
    return (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def truncate_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint8 by truncation (torchvision's ToPILImage)."""
    return (x[0].clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def pil_resize(image: np.ndarray, size: Size) -> np.ndarray:
    """Pillow's BICUBIC resize of uint8 RGB to size=(W, H) (the release's `Image.resize` default)."""
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize(tuple(size), Image.Resampling.BICUBIC))


@dataclass(frozen=True)
class ReleasePlan:
    """Sizes (width, height) of one image through the release's path."""

    src_size: Size
    scale: int
    cascade_size: Size | None  # the short side brought to process_size//s, or None
    model_size: Size  # after x s and the stretch to a multiple of 8: the condition image
    out_size: Size


def plan_release(width: int, height: int, scale: int, process_size: int) -> ReleasePlan:
    """test_seesr_sam.py l.251-263, with its float arithmetic: int(scale*W) as released."""
    if width < 1 or height < 1 or scale < 1:
        raise ValueError(f"need a positive size and scale, got {width}x{height} x{scale}")
    target = process_size // scale
    cascade = None
    w, h = width, height
    if w < target or h < target:
        ratio = target / min(w, h)
        cascade = (int(ratio * w), int(ratio * h))
        w, h = cascade
    w, h = w * scale, h * scale
    model = (w // 8 * 8, h // 8 * 8)
    if model[0] < 8 or model[1] < 8:
        raise ValueError(
            f"a {width}x{height} image at x{scale} is {w}x{h} before the stretch to a multiple of 8; "
            "the release path needs at least 8 px per side (raise process_size or use geometry exact-size)"
        )
    return ReleasePlan((width, height), scale, cascade, model, (width * scale, height * scale))


class ReleasePath:
    """The authors' resizes, rounding and colour fix (see the module docstring)."""

    name = "release"

    def __init__(self, scale: int, process_size: int):
        self.scale, self.process_size = scale, process_size

    def plan(self, width: int, height: int) -> ReleasePlan:
        return plan_release(width, height, self.scale, self.process_size)

    def condition(self, image: np.ndarray, plan: ReleasePlan) -> tuple[torch.Tensor, np.ndarray]:
        """The condition image (1, 3, H, W) float in [0, 1], and its uint8 form (colour-fix source)."""
        x = image
        if plan.cascade_size is not None:
            x = pil_resize(x, plan.cascade_size)
        x = pil_resize(x, (x.shape[1] * plan.scale, x.shape[0] * plan.scale))
        x = pil_resize(x, plan.model_size)
        return to_tensor(x), x

    def finish(self, decoded: torch.Tensor, reference: np.ndarray, plan: ReleasePlan, method: str) -> np.ndarray:
        """decoded (1, 3, H, W) in [0, 1] -> the saved uint8 image of plan.out_size."""
        image = round_to_uint8(decoded)  # the pipeline's output image
        if method != "none":
            fixed = color_fix(to_tensor(image), to_tensor(reference), method)
            image = truncate_to_uint8(fixed)
        return pil_resize(image, plan.out_size)


class ExactSizePath:
    """Integer sizes, one float resize, pad to a multiple and crop back (see the module docstring)."""

    name = "exact-size"

    def __init__(self, scale: int, process_size: int, pad_multiple: int):
        self.scale, self.process_size, self.pad_multiple = scale, process_size, pad_multiple

    def plan(self, width: int, height: int) -> SizePlan:
        return plan_size(width, height, self.scale, self.process_size, multiple=self.pad_multiple)

    def condition(self, image: np.ndarray, plan: SizePlan) -> tuple[torch.Tensor, torch.Tensor]:
        return prepare_condition(to_tensor(image), plan)

    def finish(self, decoded: torch.Tensor, reference: torch.Tensor, plan: SizePlan, method: str) -> np.ndarray:
        sr = crop_to(decoded, plan.work_size)
        sr = color_fix(sr, reference.to(sr), method)
        return round_to_uint8(resize_image(sr, plan.out_size).clamp(0, 1))


def image_path(geometry: Geometry, scale: int, process_size: int, pad_multiple: int) -> ReleasePath | ExactSizePath:
    if geometry == "release":
        return ReleasePath(scale, process_size)
    if geometry == "exact-size":
        return ExactSizePath(scale, process_size, pad_multiple)
    raise ValueError(f"unknown geometry {geometry!r}; allowed: {', '.join(GEOMETRIES)}")
