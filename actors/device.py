"""Which torch device an actor runs on."""

from __future__ import annotations

import torch


def pick_device(requested: str | None = None) -> str:
    """`requested` if given, else the first CUDA device the actor was given, else CPU."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def use_cpu_threads(device: str, threads: int | None) -> None:
    """On CPU, let torch use `threads` (Ray pins an actor to OMP_NUM_THREADS=num_cpus, often 1)."""
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
