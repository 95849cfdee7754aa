"""Listing inputs and choosing output keys that can never escape DST."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path, PurePosixPath

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_UNSAFE = re.compile(r"[^\w.\-]+", re.UNICODE)


def list_images(src: str | Path) -> list[Path]:
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"SRC {src} is not a folder of images")
    return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def output_key(relative: str, ext: str) -> str:
    """DST-relative key for a source path: same folders, new extension, sanitised parts.

    '..', absolute prefixes, control characters and odd unicode are neutralised,
    so no input name can write outside DST.
    """
    parts = []
    for part in PurePosixPath(relative.replace("\\", "/")).parts:
        part = unicodedata.normalize("NFKC", part)
        if part in ("", ".", "..", "/"):
            continue
        part = _UNSAFE.sub("_", part).strip("._") or "_"
        parts.append(part.encode("utf-8")[:200].decode("utf-8", "ignore"))  # file systems limit bytes
    if not parts:
        parts = ["_"]
    stem = PurePosixPath(parts[-1]).stem or "_"
    parts[-1] = f"{stem}.{ext}"
    return "/".join(parts)
