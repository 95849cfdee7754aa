"""Which torch device an actor runs on."""

from __future__ import annotations

import torch


def pick_device(requested: str | None = None) -> str:
    """`requested` if given, else the first CUDA device the actor was given, else CPU."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"
