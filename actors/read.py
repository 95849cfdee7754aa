"""Read stage: fetch each source object's bytes (transient errors retried, permanent ones recorded)."""

from __future__ import annotations

import numpy as np

from cluster.storage import StorageConfig, read_bytes

from .batch import StageTimer, ensure_status_columns, fail


class ReadStage:
    """batch: `image_id`, `src_uri` -> adds `bytes`, `src_bytes` (or an error at stage `read`)."""

    def __init__(self, storage: dict | StorageConfig | None = None):
        self.storage = StorageConfig.model_validate(storage or {})

    def __call__(self, batch: dict) -> dict:
        batch = ensure_status_columns(batch)
        data, sizes = [], []
        with StageTimer(batch, "read") as timer:
            for i, uri in enumerate(batch["src_uri"]):
                try:
                    with timer.rows([i]):
                        blob = read_bytes(str(uri), self.storage)
                except Exception as err:  # noqa: BLE001 - becomes this row's error record
                    fail(batch, i, "read", f"cannot read {uri}: {err}", type(err).__name__)
                    blob = b""
                data.append(blob)
                sizes.append(len(blob))
        batch["bytes"] = np.array(data, dtype=object)
        batch["src_bytes"] = np.array(sizes, dtype=np.int64)
        return batch
