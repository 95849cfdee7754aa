"""Semantic stage: SAM2.1 tokens (compact fp16, 256 wide) and the prompt per image."""

from __future__ import annotations

import numpy as np
import torch

from srmodel.config import ModelConfig
from srmodel.loader import load_semantic_encoder
from srmodel.text import FixedTagger, build_prompt

from .device import pick_device


class SemanticStage:
    """batch: `image` -> adds `tokens` ((N, 256) float16 per row) and `prompt`. Rows with no image pass through."""

    def __init__(self, config: dict | ModelConfig, device: str | None = None, tags: str = ""):
        self.config = ModelConfig.model_validate(config)
        self.device = pick_device(device)
        self.encoder = load_semantic_encoder(self.config, self.device)
        self.tagger = FixedTagger(tags)  # the RAM+DAPE tagger plugs in here

    def __call__(self, batch: dict) -> dict:
        images = list(batch["image"])
        ok = [i for i, im in enumerate(images) if im is not None]
        tokens: list = [None] * len(images)
        prompts = [""] * len(images)
        if ok:
            with torch.inference_mode():
                toks = self.encoder.encode([images[i] for i in ok]).to(torch.float16).cpu().numpy()
            tags = self.tagger([images[i] for i in ok])
            s = self.config.sampler
            for k, i in enumerate(ok):
                tokens[i] = toks[k]
                prompts[i] = build_prompt(tags[k], s.user_prompt, s.added_prompt)
        return dict(batch, tokens=tokens, prompt=prompts)


def as_tensor(tokens: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(tokens)).float()
