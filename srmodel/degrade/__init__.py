"""Degradation model for training pairs: seeded, batched torch ops and the release's presets."""

from .config import PRESETS, DegradeConfig, KernelConfig, StageConfig, UGCConfig, get_degrade_preset
from .model import degrade_group

__all__ = ["PRESETS", "DegradeConfig", "KernelConfig", "StageConfig", "UGCConfig", "degrade_group", "get_degrade_preset"]
