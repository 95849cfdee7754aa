"""GPU pools that place on any node shape, on Ray's real scheduler with logical GPUs.

The planned resource requests are placed as actors in the order that hurts most (semantic actors
first); then the whole tiny job runs on a cluster of 1-, 2- and 8-GPU nodes with every planned actor
started (Ray Data waits for the pool's minimum before streaming; actors fall back to CPU).
"""

import time

import pytest

from cluster import ray_runtime
from inputs import rng_image
from pipelines.job import UpscaleJob
from pipelines.manifest import read_manifest
from pipelines.pools import plan_pools
from pipelines.upscale import run_upscale
from srmodel import get_preset

STORAGE = UpscaleJob.model_fields["storage"].default


def tiny_job(src="/in", dst="/out", **resources) -> UpscaleJob:
    m = get_preset("tiny").model_dump(mode="json")
    m["sampler"].update(steps=2)
    return UpscaleJob.model_validate({"src": str(src), "dst": str(dst), "model": m, "manifest_flush_s": 0,
                                      "actor_start_timeout_s": 600,
                                      "resources": {"sr_batch": 1, "io_batch": 2, "rows_per_block": 2, **resources}})


def place(requests: list[tuple[float, float]], wait_s: float) -> int:
    """Create one actor per (gpus, cpus) request in the given order; how many become ready within wait_s."""
    import ray

    @ray.remote
    class Slot:
        def ready(self):
            return True

    actors = [Slot.options(num_gpus=g, num_cpus=c).remote() for g, c in requests]
    refs = [a.ready.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
    for a in actors:
        ray.kill(a)
    time.sleep(1)  # let Ray return the resources before the next round
    return len(ready)


def requests_of(plan: dict) -> list[tuple[float, float]]:
    sem = [(plan["semantic_gpus"], plan["semantic_cpus"])] * plan["semantic_actors"]
    return sem + [(plan["sr_gpus"], plan["sr_cpus"])] * plan["sr_actors"]  # semantic first: the worst order


@pytest.fixture(scope="module")
def one_node_8_gpus():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=12, num_gpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_one_8_gpu_node_places_every_planned_actor_and_the_old_plan_did_not(one_node_8_gpus):
    nodes = ray_runtime.alive_nodes()
    assert [(n.gpus, n.cpus) for n in nodes] == [(8, 12)]
    # The old default: 8 SR x 0.75 + 2 semantic x 0.25. Both 0.25s land on GPU 0 and one SR never starts.
    assert place([(0.25, 0.5)] * 2 + [(0.75, 1)] * 8, wait_s=20) == 9
    fused = plan_pools(tiny_job(), nodes=nodes)
    assert fused["sr_actors"] == 8 and place(requests_of(fused), wait_s=120) == 8
    split = plan_pools(tiny_job(layout="split"), nodes=nodes)
    assert (split["sr_actors"], split["semantic_actors"]) == (8, 1)
    assert place(requests_of(split), wait_s=120) == 9


@pytest.fixture
def mixed_cluster(tiny_cache):
    """A CPU head and worker nodes of 1, 2 and 8 logical GPUs (one CPU per GPU, one more for IO tasks)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    for gpus in (1, 2, 8):
        c.add_node(num_cpus=gpus + 1, num_gpus=gpus)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.mark.slow
def test_tiny_job_on_nodes_of_1_2_and_8_gpus_starts_every_planned_actor(mixed_cluster, tmp_path):
    nodes = ray_runtime.alive_nodes()
    assert sorted(n.gpus for n in nodes) == [0, 1, 2, 8]
    split = plan_pools(tiny_job(layout="split"), nodes=nodes)
    assert place(requests_of(split), wait_s=120) == split["sr_actors"] + split["semantic_actors"] == 12
    src = tmp_path / "src"
    src.mkdir()
    for k in range(6):
        rng_image(16, 12, k).save(src / f"{k}.png")
    summary = run_upscale(tiny_job(src, tmp_path / "out"))
    # Ray Data starts the pool's minimum (all 11 planned actors) before streaming, or fails after the timeout.
    assert summary["pools"]["sr_actors"] == summary["pools"]["sr_actors_max"] == 11
    assert summary["by_status"] == {"ok": 6}
    rows = read_manifest(str(tmp_path / "out"), STORAGE).to_pylist()
    assert len({r["image_id"] for r in rows}) == 6
