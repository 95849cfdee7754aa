"""Decode and validate: encoded bytes -> upright RGB uint8 arrays, or an error per row."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .batch import EMPTY_IMAGE, StageTimer, ensure_status_columns, fail, ok_rows, size

# A truncated file is an error, not a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 64_000_000


class DecodeError(ValueError):
    """An input that is not a usable image; the message says what is wrong.

    `size` is (width, height) when the header was read (e.g. a truncated JPEG), else None.
    """

    def __init__(self, message: str, size: tuple[int, int] | None = None):
        super().__init__(message)
        self.size = size


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """Bytes -> (H, W, 3) uint8 RGB, upright per EXIF; alpha is composited on white."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    w = h = None
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            # Checked from the header, before any pixel is allocated (decompression bombs).
            if w * h > max_pixels:
                raise DecodeError(f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}; raise max_pixels to allow it",
                                  (w, h))
            frames = getattr(img, "n_frames", 1)
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            notes = {"mode": img.mode}
            if frames > 1:
                notes["frames"] = f"first of {frames} used"
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
    except UnidentifiedImageError as err:
        raise DecodeError("not an image file: no known image format recognised in its bytes") from err
    except Image.DecompressionBombError as err:
        raise DecodeError(f"refused as a decompression bomb: {err}", (w, h) if w else None) from err
    except Exception as err:  # noqa: BLE001 - malformed files raise all sorts (struct.error, EOFError, ...)
        raise DecodeError(f"not a readable image: {type(err).__name__}: {err}", (w, h) if w else None) from err
    return np.ascontiguousarray(rgb), notes


def sort_by_working_size(batch: dict, *, scale: int, process_size: int, multiple: int) -> dict:
    """The batch's rows reordered by padded working size (what the SR stage can batch together); errors last."""
    from srmodel.imaging.sizes import plan_size

    def key(i: int):
        w, h = int(batch["src_width"][i]), int(batch["src_height"][i])
        if batch["error_type"][i] or not w or not h:
            return (1, 0, 0)
        return (0, *plan_size(w, h, scale, process_size, multiple=multiple).padded_size)

    order = sorted(range(size(batch)), key=key)
    if order == list(range(size(batch))):
        return batch
    return {k: (v[order] if isinstance(v, np.ndarray) else [v[i] for i in order]) for k, v in batch.items()}


class DecodeStage:
    """batch: `bytes` -> `image` (H, W, 3) uint8, `src_width`, `src_height`; drops `bytes`."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels

    def __call__(self, batch: dict) -> dict:
        batch = ensure_status_columns(batch)
        n = size(batch)
        images, widths, heights, notes = [EMPTY_IMAGE] * n, [0] * n, [0] * n, [""] * n
        with StageTimer(batch, "decode") as timer:
            for i in ok_rows(batch):
                try:
                    with timer.rows([i]):
                        rgb, info = decode_image(bytes(batch["bytes"][i]), max_pixels=self.max_pixels)
                except DecodeError as err:
                    fail(batch, i, "decode", f"{batch['src_uri'][i]}: {err}", type(err).__name__)
                    if err.size:  # the header was read: the manifest keeps the source's size
                        widths[i], heights[i] = err.size
                    continue
                images[i] = rgb
                heights[i], widths[i] = rgb.shape[:2]
                notes[i] = json.dumps(info, sort_keys=True)
        batch.pop("bytes", None)
        batch.update(image=images, src_width=np.array(widths, np.int32), src_height=np.array(heights, np.int32), decode_notes=notes)
        return batch
