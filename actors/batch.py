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


@contextmanager
def timed(batch: dict, name: str):
    """Adds `t_<name>_ms`: the stage's wall time per row of the batch."""
    t0 = time.perf_counter()
    yield
    per_row = (time.perf_counter() - t0) * 1000 / max(1, size(batch))
    batch[f"t_{name}_ms"] = np.full(size(batch), per_row)


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
