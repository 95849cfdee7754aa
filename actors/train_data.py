"""The training data stage (CPU, Ray Data map_batches): shard rows -> decoded pairs and token ids.

In: `gt_png`, `lr_png`, `prompt`, `unit_id` (the `build-trainset` shard schema).
Out: `gt` (H, W, 3) uint8, `lr_up` (H, W, 3) uint8 (LR bicubic-upsampled to the GT
size), `input_ids` (77,) int64, `key` int64 (stable per sample: seeds its noise).
GPUs never decode PNGs or tokenise.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from .decode import decode_image


def sample_key(unit_id: str) -> int:
    return int.from_bytes(hashlib.sha256(unit_id.encode()).digest()[:8], "little") >> 1


def upsample_lr(lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch bicubic (no antialias, as the release's sr_bicubic), rounded back to uint8 as it stored it."""
    x = torch.from_numpy(np.array(lr, np.uint8)).permute(2, 0, 1)[None].float() / 255
    up = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    return (up[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


class TrainDecode:
    """Callable class for map_batches: the tokenizer loads once per actor."""

    def __init__(self, tokenizer_folder: str | None = None, storage: dict | None = None, tokenizer=None):
        from transformers import CLIPTokenizer

        from .staging import staged_path

        # The folder may be on object storage (--weights s3://...): staged on this node first.
        self.tokenizer = tokenizer or CLIPTokenizer.from_pretrained(staged_path(tokenizer_folder, storage))

    def __call__(self, batch: dict) -> dict:
        gts, lrs, prompts, keys = [], [], [], []
        for gt_png, lr_png, prompt, unit_id in zip(batch["gt_png"], batch["lr_png"], batch["prompt"], batch["unit_id"]):
            try:
                gt, _ = decode_image(bytes(gt_png))
                lr, _ = decode_image(bytes(lr_png))
            except ValueError:
                # A corrupt pair is dropped (build-trainset's manifest already records bad inputs).
                continue
            gts.append(gt)
            lrs.append(upsample_lr(lr, gt.shape[:2]))
            prompts.append(str(prompt or ""))
            keys.append(sample_key(str(unit_id)))
        tok = self.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="np").input_ids if prompts else np.zeros((0, tok.model_max_length), np.int64)
        shape = gts[0].shape if gts else (0, 0, 3)
        return {
            "gt": np.stack(gts) if gts else np.zeros((0, *shape), np.uint8),
            "lr_up": np.stack(lrs) if lrs else np.zeros((0, *shape), np.uint8),
            "input_ids": ids.astype(np.int64),
            "key": np.asarray(keys, np.int64),
        }
