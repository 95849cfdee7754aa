"""Size planning and the float resize/pad/crop of the exact-size path (`image_paths.ExactSizePath`).

The released SeeSR test script (METHOD.md §2.4) does, for an input of
(W0, H0), scale s and process size P:

1. if W0 < P//s or H0 < P//s, rescale so the SHORT side becomes P//s,
   keeping aspect (the other side truncated to int);
2. multiply both sides by s -> working size (W1, H1);
3. stretch to a multiple of 8 (distorting aspect).

The release path (`image_paths.ReleasePath`) reproduces all three with PIL. The exact-size path
uses this module: it keeps 1-2, replaces 3 by padding to a multiple (right/bottom) and cropping
afterwards, and always resizes the result to exactly (W0*s, H0*s). `plan_size` is also what the
decode stage uses to sort images of similar working sizes into the same batches.
Sizes are (width, height) tuples everywhere; tensors are (B, C, H, W).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "SizePlan",
    "plan_size",
    "resize_image",
    "pad_to",
    "crop_to",
    "prepare_condition",
    "finish_output",
]

Size = tuple[int, int]


@dataclass(frozen=True)
class SizePlan:
    """Sizes for one input through the SR stage, all (width, height)."""

    src_size: Size  # (W0, H0): input image
    scale: int  # integer upscale factor s
    work_size: Size  # (W1, H1): size the model effectively works at
    padded_size: Size  # (Wp, Hp): work size rounded up to the multiple
    out_size: Size  # (W0*s, H0*s): final output

    @property
    def model_size(self) -> Size:
        """The size the diffusion model works at (the condition image)."""
        return self.padded_size

    @property
    def pad(self) -> Size:
        """(right, bottom) padding in pixels from work size to padded size."""
        return (
            self.padded_size[0] - self.work_size[0],
            self.padded_size[1] - self.work_size[1],
        )


def _is_int(v: object) -> bool:
    # bool is an Integral but a True "scale" is almost surely a bug.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_int(name: str, value: object, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


def plan_size(
    width: int, height: int, scale: int, process_size: int = 512, multiple: int = 8
) -> SizePlan:
    """Plan work/padded/output sizes for a (width, height) input at `scale`."""
    w0 = _check_int("width", width, 1)
    h0 = _check_int("height", height, 1)
    s = _check_int("scale", scale, 1)
    p = _check_int("process_size", process_size, 0)
    m = _check_int("multiple", multiple, 1)

    target_short = p // s
    if w0 < target_short or h0 < target_short:
        # Upscale so the short side is exactly P//s.  Integer arithmetic gives
        # the exact floor of other*(P//s)/short; the released float code
        # int(scale*W) can land one pixel low when the product is integral.
        short = min(w0, h0)
        w = w0 * target_short // short
        h = h0 * target_short // short
    else:
        # Never downscale: large inputs keep their size.
        w, h = w0, h0
    work = (w * s, h * s)
    padded = (_round_up(work[0], m), _round_up(work[1], m))
    return SizePlan(
        src_size=(w0, h0),
        scale=s,
        work_size=work,
        padded_size=padded,
        out_size=(w0 * s, h0 * s),
    )


def _hw(x: torch.Tensor) -> Size:
    """(width, height) of a (B, C, H, W) tensor."""
    return (x.shape[-1], x.shape[-2])


def resize_image(x: torch.Tensor, size: Size, mode: str = "bicubic") -> torch.Tensor:
    """Resize float (B, C, H, W) to size=(W, H); antialiased when shrinking.

    Returns `x` itself when it already has that size.  Not clamped: bicubic
    can overshoot [0, 1], callers clamp where it matters.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    w, h = size
    if _hw(x) == (w, h):
        return x
    kwargs = {}
    if mode in ("bilinear", "bicubic"):
        # Antialias only matters when shrinking; without it a big downscale aliases.
        shrinking = w < x.shape[-1] or h < x.shape[-2]
        kwargs = {"align_corners": False, "antialias": shrinking}
    elif mode in ("linear", "trilinear"):
        kwargs = {"align_corners": False}
    # Half-precision interpolation is not supported everywhere on CPU and is
    # less accurate; compute in float32 and cast back.
    dtype = x.dtype
    xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    out = F.interpolate(xf, size=(h, w), mode=mode, **kwargs)
    return out.to(dtype)


def pad_to(x: torch.Tensor, padded_size: Size) -> torch.Tensor:
    """Pad (B, C, H, W) right/bottom to padded_size=(Wp, Hp).

    Reflect padding (no hard edge for the model) when both pads are smaller
    than the image sides, otherwise replicate: reflect fails for tiny images.
    """
    w, h = _hw(x)
    wp, hp = padded_size
    pad_r, pad_b = wp - w, hp - h
    if pad_r < 0 or pad_b < 0:
        raise ValueError(f"padded_size {padded_size} is smaller than image size {(w, h)}")
    if pad_r == 0 and pad_b == 0:
        return x
    mode = "reflect" if pad_r < w and pad_b < h else "replicate"
    return F.pad(x, (0, pad_r, 0, pad_b), mode=mode)


def crop_to(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Top-left crop of (B, C, H, W) to size=(W, H); the inverse of pad_to."""
    w, h = size
    xw, xh = _hw(x)
    if w > xw or h > xh:
        raise ValueError(f"crop size {size} is larger than image size {(xw, xh)}")
    return x[..., :h, :w]


def prepare_condition(
    images: torch.Tensor, plan: SizePlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build the model's condition image for a batch sharing one plan.

    images: float (B, 3, H0, W0) in [0, 1].  Returns (padded, work):
    padded (B, 3, Hp, Wp) fed to the model and the unpadded working image
    (B, 3, H1, W1), e.g. as colour-fix reference.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if _hw(images) != plan.src_size:
        raise ValueError(
            f"images size {_hw(images)} does not match plan src_size {plan.src_size}"
        )
    # Bicubic overshoots; the model expects [0, 1] input.
    work = resize_image(images, plan.work_size, mode="bicubic").clamp(0.0, 1.0)
    return pad_to(work, plan.padded_size), work


def finish_output(sr_padded: torch.Tensor, plan: SizePlan) -> torch.Tensor:
    """Crop padded SR output to work size, then resize to exactly out_size; in [0, 1]."""
    if _hw(sr_padded) != plan.padded_size:
        raise ValueError(
            f"sr_padded size {_hw(sr_padded)} does not match plan padded_size {plan.padded_size}"
        )
    out = crop_to(sr_padded, plan.work_size)
    out = resize_image(out, plan.out_size, mode="bicubic")
    return out.clamp(0.0, 1.0)
