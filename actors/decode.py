"""Decode and validate: encoded bytes -> upright RGB uint8 arrays, or an error per row."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 64_000_000


class DecodeError(ValueError):
    """An input that is not a usable image; the message says what is wrong."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """Bytes -> (H, W, 3) uint8 RGB, upright per EXIF; alpha is composited on white."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            # Checked from the header, before any pixel is allocated (decompression bombs).
            if w * h > max_pixels:
                raise DecodeError(f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}; raise max_pixels to allow it")
            frames = getattr(img, "n_frames", 1)
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            notes = {"mode": img.mode, "frames": frames}
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(canvas, rgba)
                notes["alpha"] = "composited on white"
            if img.mode == "I;16" or img.mode.startswith("I"):
                arr = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.clip(arr / 257.0, 0, 255).astype(np.uint8))
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except DecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise DecodeError(f"refused as a decompression bomb: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DecodeError(f"not a readable image: {err}") from err
    return np.ascontiguousarray(rgb), notes


class DecodeStage:
    """batch: `src_uri`, `bytes` -> adds `image`, `src_width`, `src_height`, `error_type`, `error_message`."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels

    def __call__(self, batch: dict) -> dict:
        images, widths, heights, etypes, emsgs = [], [], [], [], []
        for data in batch["bytes"]:
            try:
                rgb, _ = decode_image(bytes(data), max_pixels=self.max_pixels)
                images.append(rgb)
                heights.append(rgb.shape[0])
                widths.append(rgb.shape[1])
                etypes.append("")
                emsgs.append("")
            except DecodeError as err:
                images.append(None)
                widths.append(0)
                heights.append(0)
                etypes.append(type(err).__name__)
                emsgs.append(str(err))
        return dict(batch, image=images, src_width=widths, src_height=heights, error_type=etypes, error_message=emsgs)
