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

A death on a GPU that device_health.py's record later quarantines is not held against the image.
Ray's own retry counts stay bounded (`RetryConfig`) as the backstop.
"""

from __future__ import annotations

import hashlib
import logging
import os

from .batch import concat_rows, ensure_status_columns, fail, size
from .device_health import (FATAL_DEVICE_ERRORS, DeviceQuarantined, DeviceRecord, check_device, describe,
                            device_keys, device_location, is_fatal_device_error)

WORKER_CRASHED = "WorkerCrashed"
log = logging.getLogger(__name__)


class CrashJournal:
    """(Ray actor, no CPU) batches in flight: attempts, the image being tried, deaths blamed per image; the
    run's GPU fault record (device_health.py) and the GPU actors alive, for the driver's watchdog."""

    def __init__(self, max_device_faults: int = 3):
        self.inflight: dict[str, dict] = {}
        self.devices = DeviceRecord(max_device_faults)
        self.actors: dict[str, tuple] = {}  # actor id -> (handle, where)

    def begin(self, key: str, where: dict | None = None) -> dict:
        """An attempt at batch `key` starts (on GPU `where`, None for CPU stages); a previous attempt that never
        ended died. Returns the attempt number, deaths per image (those on GPUs quarantined since left out)
        and whether this GPU is quarantined (the actor must stop)."""
        e = self.inflight.setdefault(key, {"attempts": 0, "current": None, "crashes": {}, "keys": []})
        if e["current"] is not None:  # the previous attempt died while trying this image
            e["crashes"].setdefault(e["current"], []).append(e["keys"])
            e["current"] = None
        e["attempts"] += 1
        e["keys"] = device_keys(where)
        bad = self.devices.quarantined_keys()
        crashes = {i: sum(1 for keys in deaths if not bad.intersection(keys)) for i, deaths in e["crashes"].items()}
        return {"attempts": e["attempts"], "crashes": crashes, "quarantined": bool(bad.intersection(e["keys"]))}

    def trying(self, key: str, image_id: str | None) -> None:
        if key in self.inflight:
            self.inflight[key]["current"] = image_id

    def end(self, key: str) -> None:
        e = self.inflight.pop(key, None)
        if e:
            self.devices.finished(e["keys"])

    def pending(self) -> int:
        return len(self.inflight)

    def blame(self, key: str, image_id: str) -> None:
        e = self.inflight.get(key, {})
        self.devices.blamed(image_id, [k for keys in e.get("crashes", {}).get(image_id, []) for k in keys])

    def device_fault(self, where: dict, images: list[str], error: str) -> bool:
        return self.devices.fault(device_keys(where), images, error)

    def device_state(self, where: dict) -> str:
        return self.devices.status(device_keys(where))

    def device_passed(self, where: dict) -> None:
        self.devices.passed(device_keys(where))

    def excluded_nodes(self) -> list[str]:
        return self.devices.excluded_nodes()

    def quarantined(self) -> list[dict]:
        return self.devices.report()

    def register(self, actor, where: dict) -> None:
        self.actors[actor._actor_id.hex()] = (actor, where)

    def gpu_actors(self) -> dict[str, tuple]:
        return dict(self.actors)

    def forget_actors(self) -> None:
        self.actors.clear()


def batch_key(stage: str, batch: dict) -> str:
    ids = "\n".join(sorted(str(i) for i in batch["image_id"]))
    return f"{stage}:{hashlib.sha256(ids.encode()).hexdigest()[:24]}"


def _rows(batch: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in batch.items()}


def end_if_fatal(out: dict, on_fatal=None) -> dict:
    """A fatal device error ends this process, so Ray replaces the actor and retries the batch; `on_fatal(ids,
    error)` records it against the GPU first."""
    errors = out.get("error_type", [])
    fatal = [i for i, e in enumerate(errors) if e in FATAL_DEVICE_ERRORS]
    if fatal:
        message = str(out["error_message"][fatal[0]])
        log.error("fatal device error (%s: %s): ending this worker so Ray replaces it", errors[fatal[0]], message)
        if on_fatal is not None:
            on_fatal([str(i) for i in out["image_id"]], f"{errors[fatal[0]]}: {message}")
        os._exit(70)
    return out


def guarded_call(fn, batch: dict, stage: str, journal, max_crashes: int, where: dict | None = None,
                 on_fatal=None) -> dict:
    """fn(batch) under the crash journal (see the module doc); `journal` None runs fn(batch) as is. `where`:
    the GPU this runs on (GPU stages), so deaths there count against it and a quarantined GPU stops its actor."""
    if journal is None or not size(batch):
        return end_if_fatal(fn(batch), on_fatal)
    import ray

    key = batch_key(stage, batch)
    try:
        state = ray.get(journal.begin.remote(key, where))
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
        return end_if_fatal(fn(batch), on_fatal)  # journal restarting: the batch runs unguarded rather than failing
    if state.get("quarantined"):
        # Another actor on this GPU had it quarantined: end, so the restart stops in its constructor.
        log.error("%s is quarantined: ending this worker", describe(where))
        os._exit(70)
    if state["attempts"] == 1:
        out = end_if_fatal(fn(batch), on_fatal)
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
                 "(native crash, out of memory or a device error); it was not retried again", WORKER_CRASHED)
            journal.blame.remote(key, image_id)  # its deaths say nothing about the GPU
        else:
            ray.get(journal.trying.remote(key, image_id))  # recorded before the attempt that may kill us
        parts.append(end_if_fatal(fn(one), on_fatal))
    journal.end.remote(key)
    return concat_rows(parts)


class Guarded:
    """A stage class under the crash journal: `guarded(SRStage)` is a drop-in class for map_batches.

    On a GPU, the constructor first asks the journal about this GPU: quarantined, it stops (DeviceQuarantined:
    Ray does not restart an actor whose constructor raised); suspect (a fault since the last check), it runs
    the stage's self-test (`check_device`) before loading anything. A fatal device error while loading the
    model quarantines the GPU. Then the actor registers, so the driver can stop it if it never restarts.
    """

    stage_cls: type = None
    stage_name: str = ""

    def __init__(self, *, journal=None, max_crashes: int = 1, **kwargs):
        self.journal, self.max_crashes = journal, max_crashes
        self.where = device_location() if journal is not None else None
        if self.where:
            self._admit(kwargs.get("device"))
        try:
            self.stage = self.stage_cls(**kwargs)
        except Exception as err:
            if self.where and is_fatal_device_error(err):
                self._fault([], f"loading the model: {type(err).__name__}: {err}")
                raise DeviceQuarantined(f"{describe(self.where)} failed while loading the model ({err}); it is "
                                        "quarantined for this run") from err
            raise
        if self.where:
            import ray

            self.journal.register.remote(ray.get_runtime_context().current_actor, self.where)

    def _admit(self, device: str | None) -> None:
        import ray

        try:
            state = ray.get(self.journal.device_state.remote(self.where), timeout=60)
        except Exception:  # noqa: BLE001 - the journal restarting: start unchecked rather than not at all
            log.warning("the crash journal did not answer: %s starts without its device check", describe(self.where))
            return
        if state == "suspect":
            try:
                getattr(self.stage_cls, "check_device", check_device)(device)
            except Exception as err:  # noqa: BLE001 - any failure of a fresh process on no image is the GPU's
                self._fault([], f"self-test: {type(err).__name__}: {err}")
                state = "quarantined"
            else:
                self.journal.device_passed.remote(self.where)
        if state == "quarantined":
            raise DeviceQuarantined(f"{describe(self.where)} is quarantined for this run after repeated device "
                                    "errors; this actor stops and new ones avoid the node")

    def _fault(self, images: list[str], error: str) -> None:
        import ray

        try:
            ray.get(self.journal.device_fault.remote(self.where, images, error), timeout=30)
        except Exception:  # noqa: BLE001 - the process ends anyway; the next attempt's begin records the death
            log.warning("could not record a device fault on %s", describe(self.where))

    def __call__(self, batch: dict):
        """A generator (Ray Data takes each yield as an output block): the batch in the stage's `parts` (SR: by
        output pixels), each under the journal on its own; stages without `parts` yield it whole."""
        parts = getattr(self.stage, "parts", None)
        for lo, hi in parts(batch) if parts else [(0, size(batch))]:
            one = batch if (lo, hi) == (0, size(batch)) else {k: v[lo:hi] for k, v in batch.items()}
            yield guarded_call(self.stage, one, self.stage_name, self.journal, self.max_crashes, self.where,
                               self._fault if self.where else None)


def guarded(stage_cls: type, stage_name: str) -> type:
    """A Guarded subclass named after the stage (Ray titles its actors by the class name)."""
    return type(f"Guarded{stage_cls.__name__}", (Guarded,), {"stage_cls": stage_cls, "stage_name": stage_name,
                                                             "__module__": __name__})
