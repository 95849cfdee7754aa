"""Stable image ids and per-image seeds: output pixels never depend on batch composition."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def image_id_from_uri(uri: str) -> str:
    """Stable id of a source image: a hash of its URI (32 hex chars)."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:32]


def seed_for(image_id: str, base_seed: int = 0) -> int:
    """A 63-bit seed from the image id (and a job-level base seed)."""
    digest = hashlib.sha256(f"{base_seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int) -> "torch.Generator":
    import torch  # here, not at the top: listing/planning tasks hash URIs and must not pay torch's import

    # CPU generators: the same seed gives the same noise on any accelerator.
    return torch.Generator(device="cpu").manual_seed(seed)
