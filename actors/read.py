"""Read stage: fetch each source object's bytes, several at once; a failed fetch becomes the row's error."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cluster.storage import StorageConfig, error_code, read_bytes

from .batch import StageTimer, ensure_status_columns, fail


class ReadStage:
    """batch: `image_id`, `src_uri` -> adds `bytes`, `src_bytes` (or an error at stage `read`).

    Object stores answer one GET in tens of ms whatever its size: `threads` fetches in
    flight per task keep a read task from idling on latency. Retries are the storage
    client's own (botocore retry mode); what is left after them is this row's error,
    named by its S3 error code.
    """

    def __init__(self, storage: dict | StorageConfig | None = None, threads: int = 8):
        self.storage = StorageConfig.model_validate(storage or {})
        self.threads = threads

    def _fetch(self, uri: str):
        t0 = time.perf_counter()
        try:
            blob, err = read_bytes(uri, self.storage), None
        except Exception as e:  # noqa: BLE001 - becomes this row's error record
            blob, err = b"", e
        return blob, err, (time.perf_counter() - t0) * 1000

    def __call__(self, batch: dict) -> dict:
        batch = ensure_status_columns(batch)
        uris = [str(u) for u in batch["src_uri"]]
        todo = [i for i, e in enumerate(batch["error_type"]) if not e]  # rows failed already (WorkerCrashed) are not fetched
        results = [(b"", None, 0.0)] * len(uris)
        with StageTimer(batch, "read") as timer:
            if self.threads > 1 and len(todo) > 1:
                with ThreadPoolExecutor(min(self.threads, len(todo))) as pool:
                    fetched = list(pool.map(self._fetch, [uris[i] for i in todo]))
            else:
                fetched = [self._fetch(uris[i]) for i in todo]
            for i, got in zip(todo, fetched):
                results[i] = got
                timer.charge([i], got[2])  # each fetch's own time, though they overlap in threads
        for i, (uri, (_, err, _)) in enumerate(zip(uris, results)):
            if err is not None:
                fail(batch, i, "read", f"cannot read {uri}: {err}", error_code(err))
        batch["bytes"] = np.array([blob for blob, _, _ in results], dtype=object)
        batch["src_bytes"] = np.array([len(blob) for blob, _, _ in results], dtype=np.int64)
        return batch
