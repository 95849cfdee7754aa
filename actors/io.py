"""The IO stages as plain functions, for Ray Data task pools (cheap to build per batch).

Kept in their own light module: a task worker that unpickles them imports
only what reading, decoding and writing need, not torch or diffusers.
"""

from __future__ import annotations

from .decode import DecodeStage
from .read import ReadStage
from .write import WriteStage


def read_decode(batch: dict, storage: dict, max_pixels: int) -> dict:
    return DecodeStage(max_pixels)(ReadStage(storage)(batch))


def write(batch: dict, dst: str, fmt: str, quality: int, storage: dict) -> dict:
    return WriteStage(dst, fmt, quality, storage)(batch)
