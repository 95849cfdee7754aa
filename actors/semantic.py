"""Semantic stage: SAM2.1 tokens (compact fp16, 256 wide) and the prompt per image."""

from __future__ import annotations

import numpy as np
import torch

from srmodel.config import ModelConfig
from srmodel.loader import load_semantic_encoder
from srmodel.prompts import FixedTagger, build_prompt

from .batch import ensure_status_columns, fail, ok_rows, size, timed
from .device import pick_device, use_cpu_threads


class SemanticStage:
    """batch: `image` -> adds `tokens` ((N, 256) float16 per row) and `prompt`."""

    def __init__(self, config: dict | ModelConfig, device: str | None = None, tags: str = "",
                 cpu_threads: int | None = None):
        self.config = ModelConfig.model_validate(config)
        self.device = pick_device(device)
        use_cpu_threads(self.device, cpu_threads)
        self.encoder = load_semantic_encoder(self.config, self.device)
        self.tagger = FixedTagger(tags)  # the RAM+DAPE tagger plugs in here
        self.empty = np.zeros((self.encoder.num_tokens, self.encoder.d_model), np.float16)

    def _encode(self, images: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return self.encoder.encode(images).to(torch.float16).cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        batch = ensure_status_columns(batch)
        n = size(batch)
        tokens, prompts = [self.empty] * n, [""] * n
        with timed(batch, "semantic"):
            rows = ok_rows(batch)
            images = [batch["image"][i] for i in rows]
            try:
                encoded = list(self._encode(images)) if rows else []
            except Exception:  # noqa: BLE001 - retry one by one so one bad image fails alone
                encoded = []
                for i, im in zip(rows, images):
                    try:
                        encoded.append(self._encode([im])[0])
                    except Exception as err:  # noqa: BLE001
                        fail(batch, i, "semantic", err)
                        encoded.append(None)
            tags = self.tagger(images)
            s = self.config.sampler
            for k, i in enumerate(rows):
                if encoded[k] is not None:
                    tokens[i] = encoded[k]
                    prompts[i] = build_prompt(tags[k], s.user_prompt, s.added_prompt)
        batch.update(tokens=tokens, prompt=prompts)
        return batch
