"""Semantic stage: SAM2.1 tokens (256 wide; fp16 for fp16 models, else fp32) and the prompt per image.

With a cache URI, tokens and tags are stored per image_id (under a key of the
semantic model's identity) and read back on later runs; the SAM2 encoder is
then loaded only if some image misses the cache.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import torch

from cluster.storage import StorageConfig, filesystem, join, write_bytes_atomic
from srmodel.config import ModelConfig
from srmodel.stages import load_semantic_encoder, load_tagger, resolve
from srmodel.prompts import build_prompt

from .batch import StageTimer, batch_or_each, ensure_status_columns, ok_rows, size
from .device import pick_device, use_cpu_threads
from .staging import staged_model


class SemanticStage:
    """batch: `image` -> adds `tokens` ((N, 256) per row, in `token_dtype`) and `prompt`.

    SAM2 runs in fp32 (as released); the tokens travel in the dtype the SR models will cast them to
    at the attention (fp16 for fp16 models: the same rounding, half the bytes), else in fp32.
    """

    def __init__(self, config: dict | ModelConfig, device: str | None = None,
                 cpu_threads: int | None = None, cache_uri: str | None = None, storage: dict | None = None):
        self.storage = StorageConfig.model_validate(storage or {})
        # Weights given as s3:// (any fsspec URI) are staged once per node before loading.
        self.config = staged_model(resolve(ModelConfig.model_validate(config)), self.storage)
        self.device = pick_device(device)
        use_cpu_threads(self.device, cpu_threads)
        self.tagger = load_tagger(self.config, self.device)
        self.token_dtype = np.float16 if self.config.dtype == "fp16" else np.float32
        self.cache = join(cache_uri, self.semantic_key()) if cache_uri else None
        # Without a cache the encoder is needed at once: a bad checkpoint fails the actor, not every image.
        self._encoder = None if self.cache else load_semantic_encoder(self.config, self.device)

    def semantic_key(self) -> str:
        """Identity of what produces tokens and tags: cached entries from other weights never match."""
        src, s = self.config.source, self.config.sampler
        tagger = f"fixed:{s.fixed_tags}" if s.prompt_source == "fixed" else f"ram:{src.ram}|{src.dape}|{src.ram_tag_list}"
        ident = f"{src.revision}|{src.sam2_checkpoint}|{src.sam2_config}|{self.config.dtype}|{tagger}"
        return hashlib.sha256(ident.encode()).hexdigest()[:16]

    @property
    def encoder(self):
        if self._encoder is None:  # loaded on the first cache miss only
            self._encoder = load_semantic_encoder(self.config, self.device)
        return self._encoder

    def _encode(self, images: list[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            return list(self.encoder.encode(images).float().cpu().numpy().astype(self.token_dtype))

    def _cache_get(self, image_id: str):
        """Cached (tokens, tags), or None: a missing, unreadable or corrupt entry is just a miss."""
        try:
            fs, path = filesystem(join(self.cache, f"{image_id}.npz"), self.storage)
            with np.load(io.BytesIO(fs.cat_file(path))) as data:
                return data["tokens"], str(data["tags"])
        except Exception:  # noqa: BLE001 - the cache is an optimisation, never a failure
            return None

    def _cache_put(self, image_id: str, tokens: np.ndarray, tags: str) -> None:
        try:
            buf = io.BytesIO()
            np.savez(buf, tokens=tokens, tags=np.array(tags))
            write_bytes_atomic(join(self.cache, f"{image_id}.npz"), buf.getvalue(), self.storage)
        except Exception:  # noqa: BLE001 - a failed cache write costs a recompute later, nothing more
            pass

    def __call__(self, batch: dict) -> dict:
        batch = ensure_status_columns(batch)
        n = size(batch)
        tokens: list = [None] * n
        tags: list = [""] * n
        with StageTimer(batch, "semantic") as timer:
            todo = []
            for i in ok_rows(batch):
                with timer.rows([i]):
                    hit = self._cache_get(str(batch["image_id"][i])) if self.cache else None
                if hit is None:
                    todo.append(i)
                else:
                    tokens[i], tags[i] = hit
            images = [batch["image"][i] for i in todo]
            with timer.rows(todo):  # batched SAM2 encoder and tagger: an equal share each (fixed input size)
                encoded = batch_or_each(self._encode, images, todo, batch, "semantic")
                new_tags = batch_or_each(self.tagger, images, todo, batch, "semantic")
            for k, i in enumerate(todo):
                if encoded[k] is not None and new_tags[k] is not None:
                    tokens[i], tags[i] = encoded[k], new_tags[k]
                    if self.cache:
                        self._cache_put(str(batch["image_id"][i]), encoded[k], new_tags[k])
        s = self.config.sampler
        shape = next((t.shape for t in tokens if t is not None), None)
        empty = np.zeros(shape or (1, 256), self.token_dtype)
        batch.update(
            tokens=[t if t is not None else empty for t in tokens],
            prompt=[build_prompt(tags[i], s.user_prompt, s.added_prompt, added_first=s.added_prompt_first)
                    if tokens[i] is not None else "" for i in range(n)],
            tags=tags,
        )
        return batch
