"""Writes a folder of bad and unusual inputs, and what each should become."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels; its data is a few bytes."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rng_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_inputs(folder: Path) -> dict[str, tuple]:
    """Files in `folder`; returns name -> ("ok", (W, H) upright) or ("error", error_type)."""
    folder.mkdir(parents=True, exist_ok=True)
    expect: dict[str, tuple] = {}

    def put(name: str, data: bytes, outcome: tuple) -> None:
        (folder / name).write_bytes(data)
        expect[name] = outcome

    good_jpeg = _encode(rng_image(24, 16, 1), "JPEG", quality=90)
    put("zero.jpg", b"", ("error", "DecodeError"))
    put("truncated.jpg", good_jpeg[: len(good_jpeg) // 2], ("error", "DecodeError"))
    put("text.jpg", b"this is not an image\n" * 10, ("error", "DecodeError"))
    put("bomb.png", _png_bomb(100_000, 100_000), ("error", "DecodeError"))
    put("toolarge.png", _encode(rng_image(300, 300, 2), "PNG"), ("error", "DecodeError"))  # with max_pixels 50_000
    put("plain.jpg", good_jpeg, ("ok", (24, 16)))
    put("gray.png", _encode(rng_image(20, 12, 3).convert("L"), "PNG"), ("ok", (20, 12)))
    put("rgba.png", _encode(rng_image(18, 14, 4).convert("RGBA"), "PNG"), ("ok", (18, 14)))
    put("la.png", _encode(rng_image(16, 10, 5).convert("LA"), "PNG"), ("ok", (16, 10)))
    put("palette.png", _encode(rng_image(22, 10, 6).convert("P"), "PNG"), ("ok", (22, 10)))
    put("sixteen.png", _encode(Image.fromarray(np.arange(12 * 20, dtype=np.uint16).reshape(12, 20) * 250), "PNG"),
        ("ok", (20, 12)))
    put("cmyk.jpg", _encode(rng_image(20, 16, 7).convert("CMYK"), "JPEG"), ("ok", (20, 16)))
    rotated = rng_image(20, 10, 8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to view: stored 20x10, upright 10x20
    put("rotated.jpg", _encode(rotated, "JPEG", exif=exif), ("ok", (10, 20)))
    frames = [rng_image(14, 12, 9 + k) for k in range(3)]
    put("anim.gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), ("ok", (14, 12)))
    put("anim.webp", _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]), ("ok", (14, 12)))
    put("tiny.png", _encode(rng_image(7, 5, 12), "PNG"), ("ok", (7, 5)))
    (folder / "sub").mkdir(exist_ok=True)
    put("sub/odd name ü ..x.png", _encode(rng_image(9, 9, 13), "PNG"), ("ok", (9, 9)))
    return expect
