"""Encode SR images to PNG/WebP/JPEG bytes."""

from __future__ import annotations

import io

from PIL import Image

FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG", "jpg": "JPEG"}


def encode_image(rgb, fmt: str = "png", quality: int = 95) -> bytes:
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    buf = io.BytesIO()
    kwargs = {} if fmt == "png" else {"quality": quality}
    Image.fromarray(rgb).save(buf, FORMATS[fmt], **kwargs)
    return buf.getvalue()


class EncodeStage:
    """batch: `sr_image` -> adds `out_bytes`, `dst_width`, `dst_height`."""

    def __init__(self, fmt: str = "png", quality: int = 95):
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.fmt, self.quality = fmt, quality

    def __call__(self, batch: dict) -> dict:
        data, widths, heights = [], [], []
        for img in batch["sr_image"]:
            if img is None:
                data.append(b"")
                widths.append(0)
                heights.append(0)
            else:
                data.append(encode_image(img, self.fmt, self.quality))
                heights.append(img.shape[0])
                widths.append(img.shape[1])
        return dict(batch, out_bytes=data, dst_width=widths, dst_height=heights)
