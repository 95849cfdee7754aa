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


BROKEN = {}  # {"node_file": path}: the node whose GPU is broken (read by check_device, a static method)


class BrokenGpuOnOneNode:
    """On the node named in BROKEN's file, every call reports a sticky CUDA error and a fresh process fails its
    self-test (a GPU that fell off the bus); elsewhere rows pass. Logs each constructor and call with its node."""

    def __init__(self, log: str):
        import ray

        self.log, self.node = log, ray.get_runtime_context().get_node_id()
        self.bad = Path(BROKEN["node_file"]).read_text()
        self._write(f"start {os.getpid()}")

    @staticmethod
    def check_device(device=None):
        import ray

        if ray.get_runtime_context().get_node_id() == Path(BROKEN["node_file"]).read_text():
            raise RuntimeError("CUDA error: unknown error (the device fell off the bus)")

    def _write(self, line: str):
        with open(self.log, "a") as f:
            f.write(f"{self.node} {line}\n")

    def __call__(self, batch):
        batch = ensure_status_columns(batch)
        self._write("call " + ",".join(str(i) for i in batch["image_id"]))
        for i in ok_rows(batch):
            if self.node == self.bad:
                fail(batch, i, "sr", "CUDA error: an illegal memory access was encountered", "AcceleratorError")
        batch["node"] = [self.node] * len(batch["image_id"])
        return batch


def test_a_broken_gpu_is_quarantined_its_actor_stops_and_no_image_is_blamed(tmp_path):
    """Three GPU nodes, every GPU in use: the broken one stops its actor after one restart, its images are not
    blamed (its lost batches are redone on resume), the others finish the rest; no endless restarts."""
    import ray
    import ray.data
    from ray.cluster_utils import Cluster
    from ray.data import ActorPoolStrategy

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    nodes = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(3)]
    c.wait_for_nodes()
    try:
        ray.init(address=c.address, log_to_driver=False)
        (tmp_path / "bad").write_text(nodes[1].node_id)
        BROKEN["node_file"] = str(tmp_path / "bad")
        log = tmp_path / "calls.log"
        ctx = ray.data.DataContext.get_current()
        ctx.max_errored_blocks, ctx.enable_progress_bars = 10, False
        journal = ray.remote(num_cpus=0)(CrashJournal).remote(max_device_faults=3)
        items = [{"image_id": f"img{k:02d}"} for k in range(30)]
        rows = ray.data.from_items(items, override_num_blocks=15).map_batches(
            guarded(BrokenGpuOnOneNode, "sr"), fn_constructor_kwargs={"log": str(log), "journal": journal},
            batch_size=2, compute=ActorPoolStrategy(size=3), num_gpus=1, num_cpus=0.5,
            max_restarts=-1, max_task_retries=4).take_all()
        quarantined = ray.get(journal.quarantined.remote())
        # Once no GPU actor is left alive (here: the pool ended), the driver's watchdog ends a run clearly.
        from pipelines.upscale.watchdog import ActorWatchdog

        watchdog = ActorWatchdog(journal, timeout_s=0, interval_s=3600)
        watchdog.tick()
        watchdog.stop()
    finally:
        ray.shutdown()
        c.shutdown()
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)) >= 30 - 2 * 4, "each image at most once; only the broken actor's batches lost"
    assert not [r for r in rows if r["error_type"]], "no image blamed, none failed with the GPU's error"
    assert {r["node"] for r in rows} <= {nodes[0].node_id, nodes[2].node_id}
    assert [q["node"] for q in quarantined] == [nodes[1].node_id] and "self-test" in quarantined[0]["last_error"]
    lines = log.read_text().splitlines()
    starts = [ln for ln in lines if ln.startswith(nodes[1].node_id) and " start " in ln]
    assert len(starts) == 1, "the restarted actor stopped in its constructor, before loading anything"
    assert watchdog.error is not None and f"node {nodes[1].node_id[:12]} GPU" in str(watchdog.error)
