"""Column conventions shared by the stages.

A batch is a dict of equal-length columns (lists or numpy arrays). A row whose
`error_type` is non-empty failed at the stage named in `stage`; later stages
pass it through untouched, so it still reaches the manifest.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

EMPTY_IMAGE = np.zeros((1, 1, 3), np.uint8)  # placeholder for rows without an image


def size(batch: dict) -> int:
    return len(batch["image_id"])


def concat_rows(parts: list[dict]) -> dict:
    """Batches with the same columns, one after the other (lists; Ray Data takes lists of arrays)."""
    keys = parts[0].keys()
    return {k: [x for p in parts for x in list(p[k])] for k in keys}


def ok_rows(batch: dict) -> list[int]:
    errors = batch.get("error_type")
    if errors is None:
        return list(range(size(batch)))
    return [i for i, e in enumerate(errors) if not e]


def ensure_status_columns(batch: dict) -> dict:
    n = size(batch)
    for col in ("error_type", "error_message", "stage"):
        if col not in batch:
            batch[col] = [""] * n
    return {k: list(v) if k in ("error_type", "error_message", "stage") else v for k, v in batch.items()}


def fail(batch: dict, i: int, stage: str, err: BaseException | str, error_type: str | None = None) -> None:
    batch["stage"][i] = stage
    batch["error_type"][i] = error_type or (type(err).__name__ if isinstance(err, BaseException) else "Error")
    batch["error_message"][i] = str(err)[:2000]


class StageTimer:
    """Per-image milliseconds in `t_<name>_ms`: time is charged to the rows it was spent on.

    A stage that handles images one by one charges each its own time; a batched
    forward is shared among the images in it (by `weights`, e.g. output pixels).
    Rows the stage did not work on (failed earlier) stay NaN (null in the manifest).
    """

    def __init__(self, batch: dict, name: str):
        self.batch, self.name = batch, name
        self.ms = np.full(size(batch), np.nan)

    @contextmanager
    def rows(self, rows: list[int], weights: list[float] | None = None):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.charge(rows, (time.perf_counter() - t0) * 1000, weights)

    def charge(self, rows: list[int], ms: float, weights: list[float] | None = None) -> None:
        if not rows:
            return
        w = np.asarray(weights if weights is not None else [1.0] * len(rows), np.float64)
        w = w / w.sum() if w.sum() > 0 else np.full(len(rows), 1.0 / len(rows))
        for i, share in zip(rows, w):
            self.ms[i] = (0.0 if np.isnan(self.ms[i]) else self.ms[i]) + ms * share

    def __enter__(self) -> StageTimer:
        return self

    def __exit__(self, *exc) -> None:
        self.batch[f"t_{self.name}_ms"] = self.ms


def batch_or_each(fn, items: list, rows: list[int], batch: dict, stage: str) -> list:
    """fn(items) as one batch; if that raises, item by item so only the item at fault fails (None)."""
    if not items:
        return []
    try:
        return list(fn(items))
    except Exception:  # noqa: BLE001 - isolate the culprit below
        out = []
        for i, item in zip(rows, items):
            try:
                out.append(fn([item])[0])
            except Exception as err:  # noqa: BLE001 - this row's error record
                fail(batch, i, stage, err)
                out.append(None)
        return out
