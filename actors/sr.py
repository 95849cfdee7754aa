"""Diffusion SR stage: batches compatible images (and their latent tiles) through one forward."""

from __future__ import annotations

from srmodel.config import ModelConfig
from srmodel.loader import load_upscaler
from srmodel.seeds import seed_for
from srmodel.upscaler import SRRequest

from .device import pick_device
from .semantic import as_tensor


class SRStage:
    """batch: `image_id`, `image`, `tokens`, `prompt` -> adds `sr_image` and `seed`."""

    def __init__(self, config: dict | ModelConfig, device: str | None = None, base_seed: int = 0):
        self.config = ModelConfig.model_validate(config)
        self.device = pick_device(device)
        self.upscaler = load_upscaler(self.config, self.device)
        self.base_seed = base_seed

    def __call__(self, batch: dict) -> dict:
        n = len(batch["image"])
        seeds = [seed_for(i, self.base_seed) for i in batch["image_id"]]
        ok = [i for i in range(n) if batch["image"][i] is not None]
        requests = [
            SRRequest(batch["image"][i], as_tensor(batch["tokens"][i]), batch["prompt"][i], seeds[i]) for i in ok
        ]
        out: list = [None] * n
        for i, img in zip(ok, self.upscaler.upscale(requests)):
            out[i] = img
        return dict(batch, sr_image=out, seed=seeds)
