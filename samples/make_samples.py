"""Writes the bundled sample images. They are drawn by this script (no photographs),
so they carry no third-party rights: CC0-1.0, see samples/LICENSE."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).parent


def sunset(w=96, h=64):
    y = np.linspace(0, 1, h)[:, None, None]
    sky = (1 - y) * np.array([255, 140, 60]) + y * np.array([60, 40, 120])
    img = np.broadcast_to(sky, (h, w, 3)).astype(np.uint8).copy()
    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    d.ellipse([w * 0.55, h * 0.35, w * 0.8, h * 0.7], fill=(255, 220, 120))
    d.polygon([(0, h), (w * 0.3, h * 0.55), (w * 0.6, h), ], fill=(30, 30, 40))
    return pil


def shapes(w=128, h=96):
    pil = Image.new("RGB", (w, h), (235, 235, 225))
    d = ImageDraw.Draw(pil)
    for i in range(0, w, 16):
        d.line([(i, 0), (i, h)], fill=(200, 200, 190))
    d.rectangle([10, 10, 50, 60], fill=(200, 40, 40))
    d.ellipse([60, 20, 110, 80], fill=(40, 90, 200))
    d.text((12, 70), "ugcsr", fill=(0, 0, 0))
    return pil


def small_rgba(w=45, h=31):
    a = np.zeros((h, w, 4), np.uint8)
    a[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    a[..., 2] = 180
    a[..., 3] = np.linspace(60, 255, h, dtype=np.uint8)[:, None]
    return Image.fromarray(a, "RGBA")


if __name__ == "__main__":
    sunset().save(HERE / "sunset.png")
    shapes().save(HERE / "shapes.jpg", quality=60)
    small_rgba().save(HERE / "small_rgba.png")
