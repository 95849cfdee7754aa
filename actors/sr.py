"""Diffusion SR stage: batches compatible images (and their latent tiles) through one forward."""

from __future__ import annotations

import socket
import time

import numpy as np
import torch

from srmodel.config import ModelConfig
from srmodel.errors import TimeBudgetExceeded
from srmodel.stages import load_upscaler, resolve
from srmodel.sampling.memory_model import resolve_max_batch
from srmodel.sampling.seeds import seed_for
from srmodel.upscaler import SRRequest

from .batch import EMPTY_IMAGE, StageTimer, ensure_status_columns, fail, ok_rows, size
from .device import pick_device, use_cpu_threads
from .staging import staged_model


def node_id() -> str:
    """The Ray node this actor runs on (the host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return socket.gethostname()


class SRStage:
    """batch: `image_id`, `image`, `tokens`, `prompt` -> adds `sr_image` and `seed`; drops `tokens`."""

    def __init__(self, config: dict | ModelConfig, device: str | None = None, base_seed: int = 0,
                 cpu_threads: int | None = None, max_output_pixels: int | None = None, storage: dict | None = None,
                 gpu_share: float = 1.0, fused_semantic: bool = False, time_budget_s: float | None = None,
                 call_output_pixels: int | None = None):
        self.max_output_pixels = max_output_pixels
        self.call_output_pixels = call_output_pixels  # SR outputs one call holds at most (see parts)
        self.time_budget_s = time_budget_s  # per image: past it the image gets an error row, the GPU moves on
        # Weights given as s3:// (any fsspec URI) are staged once per node before loading.
        config = staged_model(resolve(ModelConfig.model_validate(config)), storage)
        self.device = pick_device(device)
        use_cpu_threads(self.device, cpu_threads)
        # UNet rows per forward: the user's tiling.max_batch, else the most this GPU (share) holds (memory_model).
        rows = resolve_max_batch(config, self.device, share=gpu_share, semantic=fused_semantic)
        self.config = config.model_copy(update={"tiling": config.tiling.model_copy(update={"max_batch": rows})})
        self.upscaler = load_upscaler(self.config, self.device)
        self.base_seed = base_seed

    def parts(self, batch: dict) -> list[tuple[int, int]]:
        """Consecutive row ranges whose outputs hold at most `call_output_pixels` pixels each (a row alone may
        hold more): Guarded runs and hands on one range at a time, so an SR call never holds a whole batch of
        huge outputs (8 x 256 MP would be 6 GB) and neither does a write task after it."""
        n = size(batch)
        if not self.call_output_pixels or not n:
            return [(0, n)]
        errors = batch.get("error_type")
        out, start, held = [], 0, 0
        for i in range(n):
            pixels = 0
            if not (errors is not None and errors[i]):
                h, w = np.asarray(batch["image"][i]).shape[:2]
                pixels = int(np.prod(self.upscaler.plan(w, h).out_size))
            if held and held + pixels > self.call_output_pixels:
                out.append((start, i))
                start, held = i, 0
            held += pixels
        return out + [(start, n)]

    def _deadline(self, images: int) -> float | None:
        return time.monotonic() + self.time_budget_s * images if self.time_budget_s else None

    def _request(self, batch: dict, i: int, seed: int) -> SRRequest:
        tokens = torch.from_numpy(np.asarray(batch["tokens"][i], dtype=np.float32))
        return SRRequest(np.asarray(batch["image"][i], dtype=np.uint8), tokens, str(batch["prompt"][i]), seed)

    def __call__(self, batch: dict) -> dict:
        batch = ensure_status_columns(batch)
        n = size(batch)
        seeds = [seed_for(str(i), self.base_seed) for i in batch["image_id"]]
        out = [EMPTY_IMAGE] * n
        with StageTimer(batch, "sr") as timer:
            rows, pixels = [], []
            for i in ok_rows(batch):
                h, w = np.asarray(batch["image"][i]).shape[:2]
                out_w, out_h = self.upscaler.plan(w, h).out_size
                if self.max_output_pixels and out_w * out_h > self.max_output_pixels:
                    fail(batch, i, "sr", f"output would be {out_w}x{out_h} pixels, over max_output_pixels="
                         f"{self.max_output_pixels}; raise it or downscale the input", "TooLarge")
                else:
                    rows.append(i)
                    pixels.append(out_w * out_h)
            try:
                # One batched forward: its time is shared by output pixels (the work each image brought).
                with timer.rows(rows, pixels):
                    results = self.upscaler.upscale([self._request(batch, i, seeds[i]) for i in rows],
                                                    deadline=self._deadline(len(rows)))
            except Exception:  # noqa: BLE001 - isolate the image that fails; the others still finish
                timer.ms[rows] = np.nan  # the failed forward's time belongs to no image
                results = []
                for i in rows:
                    try:
                        with timer.rows([i]):
                            results.append(self.upscaler.upscale([self._request(batch, i, seeds[i])],
                                                                 deadline=self._deadline(1))[0])
                    except TimeBudgetExceeded:
                        fail(batch, i, "sr", f"denoising took longer than time_budget_s={self.time_budget_s} s "
                             "for this image; downscale it, lower the scale, or raise the budget", "TimeBudgetExceeded")
                        results.append(EMPTY_IMAGE)
                    except Exception as err:  # noqa: BLE001
                        fail(batch, i, "sr", err)
                        results.append(EMPTY_IMAGE)
            for i, img in zip(rows, results):
                out[i] = img
        for col in ("tokens", "image"):  # consumed: rows leave with only the SR image (small rows downstream)
            batch.pop(col, None)
        batch.update(sr_image=out, seed=np.array(seeds, dtype=np.int64), node_id=[node_id()] * n)
        return batch
