"""Poison inputs: bounded crash isolation for any stage, and fatal device errors that end the actor.

Python errors are caught per row inside each stage. An input that kills its
worker (host OOM, a native crash, a sticky CUDA error) cannot be caught there:
Ray restarts the worker and retries the batch, by default forever. The guard
keeps a small journal (a Ray actor, one entry per batch in flight) so the retry
knows a previous attempt died:

- first attempt: the whole batch, as usual;
- after a death: one image at a time, each announced to the journal first, so
  the next death names its culprit; an image blamed `max_crashes` times gets an
  error row (`WorkerCrashed`) and the others finish normally.

Ray's own retry counts stay bounded (`RetryConfig`) as the backstop.
"""

from __future__ import annotations

import hashlib
import logging
import os

from .batch import concat_rows, ensure_status_columns, fail, size

WORKER_CRASHED = "WorkerCrashed"
# Errors after which the device is unusable in this process (CUDA sticky errors are raised as
# torch.AcceleratorError); the actor must be replaced, not keep failing every later image.
FATAL_DEVICE_ERRORS = {"AcceleratorError"}
log = logging.getLogger(__name__)


class CrashJournal:
    """(Ray actor, no CPU) batches in flight: attempts, the image being tried, deaths blamed per image."""

    def __init__(self):
        self.inflight: dict[str, dict] = {}

    def begin(self, key: str) -> dict:
        e = self.inflight.setdefault(key, {"attempts": 0, "current": None, "crashes": {}})
        if e["current"] is not None:  # the previous attempt died while trying this image
            e["crashes"][e["current"]] = e["crashes"].get(e["current"], 0) + 1
            e["current"] = None
        e["attempts"] += 1
        return {"attempts": e["attempts"], "crashes": dict(e["crashes"])}

    def trying(self, key: str, image_id: str | None) -> None:
        if key in self.inflight:
            self.inflight[key]["current"] = image_id

    def end(self, key: str) -> None:
        self.inflight.pop(key, None)

    def pending(self) -> int:
        return len(self.inflight)


def batch_key(stage: str, batch: dict) -> str:
    ids = "\n".join(sorted(str(i) for i in batch["image_id"]))
    return f"{stage}:{hashlib.sha256(ids.encode()).hexdigest()[:24]}"


def _rows(batch: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in batch.items()}


def end_if_fatal(out: dict) -> dict:
    """A fatal device error ends this process, so Ray replaces the actor and retries the batch."""
    fatal = [e for e in out.get("error_type", []) if e in FATAL_DEVICE_ERRORS]
    if fatal:
        log.error("fatal device error (%s): ending this worker so Ray replaces it", fatal[0])
        os._exit(70)
    return out


def guarded_call(fn, batch: dict, stage: str, journal, max_crashes: int) -> dict:
    """fn(batch) under the crash journal (see the module doc); `journal` None runs fn(batch) as is."""
    if journal is None or not size(batch):
        return end_if_fatal(fn(batch))
    import ray

    key = batch_key(stage, batch)
    try:
        state = ray.get(journal.begin.remote(key))
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
        return end_if_fatal(fn(batch))  # journal restarting: the batch runs unguarded rather than failing
    if state["attempts"] == 1:
        out = end_if_fatal(fn(batch))
        journal.end.remote(key)
        return out
    batch = ensure_status_columns(batch)
    parts = []
    for i in range(size(batch)):
        image_id = str(batch["image_id"][i])
        one = _rows(batch, i)
        blamed = state["crashes"].get(image_id, 0)
        if blamed >= max_crashes and not one["error_type"][0]:
            fail(one, 0, stage, f"the {stage} worker died {blamed} time(s) while processing this image "
                 "(native crash or out of memory); it was not retried again", WORKER_CRASHED)
        else:
            ray.get(journal.trying.remote(key, image_id))  # recorded before the attempt that may kill us
        parts.append(end_if_fatal(fn(one)))
    journal.end.remote(key)
    return concat_rows(parts)


class Guarded:
    """A stage class under the crash journal: `guarded(SRStage)` is a drop-in class for map_batches."""

    stage_cls: type = None
    stage_name: str = ""

    def __init__(self, *, journal=None, max_crashes: int = 1, **kwargs):
        self.stage = self.stage_cls(**kwargs)
        self.journal, self.max_crashes = journal, max_crashes

    def __call__(self, batch: dict) -> dict:
        return guarded_call(self.stage, batch, self.stage_name, self.journal, self.max_crashes)


def guarded(stage_cls: type, stage_name: str) -> type:
    """A Guarded subclass named after the stage (Ray titles its actors by the class name)."""
    return type(f"Guarded{stage_cls.__name__}", (Guarded,), {"stage_cls": stage_cls, "stage_name": stage_name,
                                                             "__module__": __name__})
