"""Semantic + SR in one actor (the default `fused` layout, docs/pipeline.md "Pools and placement").

One actor per GPU asking for a whole GPU places on any node shape in any creation order, and the
SAM2 tokens (2 MiB per image) never cross the object store. SAM2 and the tagger are about 1% of the
work, so giving them no GPU of their own costs nothing measurable.
"""

from __future__ import annotations

from .semantic import SemanticStage
from .sr import SRStage


class SemanticSRStage:
    """batch: `image` (+ id/status columns) -> what SemanticStage then SRStage add, on one device."""

    def __init__(self, config: dict, device: str | None = None, base_seed: int = 0, cpu_threads: int | None = None,
                 max_output_pixels: int | None = None, cache_uri: str | None = None, storage: dict | None = None,
                 gpu_share: float = 1.0, time_budget_s: float | None = None, call_output_pixels: int | None = None):
        self.semantic = SemanticStage(config, device, cpu_threads, cache_uri=cache_uri, storage=storage)
        self.sr = SRStage(config, self.semantic.device, base_seed, cpu_threads, max_output_pixels, storage=storage,
                          gpu_share=gpu_share, fused_semantic=True, time_budget_s=time_budget_s,
                          call_output_pixels=call_output_pixels)

    def parts(self, batch: dict) -> list[tuple[int, int]]:
        return self.sr.parts(batch)

    def __call__(self, batch: dict) -> dict:
        return self.sr(self.semantic(batch))
