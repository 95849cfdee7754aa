"""Poison inputs on real Ray: an image that kills its worker gets a WorkerCrashed row; a fatal device error
replaces the actor. The stages below really end their process (os._exit), as a native crash or OOM kill would."""

import os
import sys
from pathlib import Path

from ray import cloudpickle
import pytest

from actors.batch import ensure_status_columns, fail, ok_rows
from actors.guard import WORKER_CRASHED, CrashJournal, guarded

pytestmark = pytest.mark.slow  # real Ray: workers that crash

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module


class DiesOnPoison:
    """Ends its process when a batch holds a poison image (in a batch or alone); records every call."""

    def __init__(self, log: str):
        self.log = log

    def __call__(self, batch):
        batch = ensure_status_columns(batch)
        ids = [str(batch["image_id"][i]) for i in ok_rows(batch)]
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {','.join(ids)}\n")
        if any(i.startswith("poison") for i in ids):
            os._exit(1)
        batch["done"] = [1] * len(batch["image_id"])
        return batch


class DeviceBreaksOnce:
    """Reports a sticky CUDA error (as SRStage records torch.AcceleratorError) the first time only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, batch):
        batch = ensure_status_columns(batch)
        if not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            for i in ok_rows(batch):
                fail(batch, i, "sr", "CUDA error: an illegal memory access was encountered", "AcceleratorError")
        batch["pid"] = [os.getpid()] * len(batch["image_id"])
        return batch


def _run(ray, items, stage_cls, kwargs, batch_size, retries=6):
    import ray.data
    from ray.data import ActorPoolStrategy

    journal = ray.remote(num_cpus=0)(CrashJournal).remote()
    ds = ray.data.from_items(items).map_batches(
        guarded(stage_cls, "sr"), fn_constructor_kwargs={**kwargs, "journal": journal, "max_crashes": 1},
        batch_size=batch_size, compute=ActorPoolStrategy(size=1), num_cpus=0.5,
        max_restarts=-1, max_task_retries=retries)
    rows = ds.take_all()
    pending = ray.get(journal.pending.remote())
    ray.kill(journal)
    return rows, pending


def test_poison_images_get_worker_crashed_rows_and_the_rest_finish(ray_local, tmp_path):
    log = tmp_path / "calls.log"
    items = [{"image_id": f"img{k}"} for k in range(8)]
    items[2]["image_id"], items[5]["image_id"] = "poison-a", "poison-b"  # two culprits in one batch of 8
    rows, pending = _run(ray_local, items, DiesOnPoison, {"log": str(log)}, batch_size=8)
    by_id = {r["image_id"]: r for r in rows}
    assert sorted(by_id) == sorted(i["image_id"] for i in items) and len(rows) == 8, "each image exactly once"
    for k, r in by_id.items():
        if k.startswith("poison"):
            assert r["error_type"] == WORKER_CRASHED and r["stage"] == "sr" and "died" in r["error_message"]
        else:
            assert not r["error_type"] and r["done"] == 1
    calls = log.read_text().splitlines()
    # 1 whole batch + 2 isolating attempts that each died on one culprit + 1 attempt that finishes
    assert len({c.split()[0] for c in calls}) == 4, calls
    assert pending == 0, "the journal forgets finished batches"


def test_fatal_device_error_replaces_the_actor_and_retries_the_batch(ray_local, tmp_path):
    marker = tmp_path / "broken-once"
    rows, _ = _run(ray_local, [{"image_id": f"img{k}"} for k in range(4)], DeviceBreaksOnce,
                   {"marker": str(marker)}, batch_size=4)
    assert len(rows) == 4 and all(not r["error_type"] for r in rows), "retried on a fresh actor, all fine"
    assert {r["pid"] for r in rows} != {int(marker.read_text())}, "the actor that saw the error is gone"
