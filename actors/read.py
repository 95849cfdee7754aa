"""Read stage: fetch each source object's bytes, several at once; a failed fetch becomes the row's error."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cluster.source_policy import SourcePolicy
from cluster.storage import StorageConfig, error_code, read_bytes

from .batch import StageTimer, ensure_status_columns, fail


class ReadStage:
    """batch: `image_id`, `src_uri` -> adds `bytes`, `src_bytes` (or an error at stage `read`).

    Object stores answer one GET in tens of ms whatever its size: `threads` fetches in
    flight per task keep a read task from idling on latency. Retries are the storage
    client's own (botocore retry mode); what is left after them is this row's error,
    named by its S3 error code. With a `policy`, a URI it refuses is never fetched: the row's
    error names the rule (cluster/source_policy.py). An object over `max_bytes` is an error row, and no more
    than max_bytes + 1 of it is ever fetched (one ranged GET).
    """

    def __init__(self, storage: dict | StorageConfig | None = None, threads: int = 8,
                 policy: dict | SourcePolicy | None = None, max_bytes: int | None = None):
        self.storage = StorageConfig.model_validate(storage or {})
        self.threads = threads
        self.policy = SourcePolicy.model_validate(policy) if policy is not None else None
        self.max_bytes = max_bytes

    def _fetch(self, uri: str):
        t0 = time.perf_counter()
        try:
            blob, err = read_bytes(uri, self.storage, max_bytes=self.max_bytes), None
        except Exception as e:  # noqa: BLE001 - becomes this row's error record
            blob, err = b"", e
        return blob, err, (time.perf_counter() - t0) * 1000

    def __call__(self, batch: dict) -> dict:
        batch = ensure_status_columns(batch)
        uris = [str(u) for u in batch["src_uri"]]
        todo = [i for i, e in enumerate(batch["error_type"]) if not e]  # rows failed already (WorkerCrashed) are not fetched
        if self.policy is not None:
            refused = {i: self.policy.refusal(uris[i]) for i in todo}
            for i, rule in refused.items():
                if rule:
                    fail(batch, i, "read", f"refusing to read {uris[i]}: {rule}", "RefusedSource")
            todo = [i for i in todo if not refused[i]]
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
