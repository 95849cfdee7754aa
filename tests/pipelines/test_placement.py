"""GPU pools that place on any node shape, on Ray's real scheduler with logical GPUs.

The planned resource requests are placed as actors in the order that hurts most (semantic actors
first); then the whole tiny job runs on a cluster of 1-, 2- and 8-GPU nodes with every planned actor
started (Ray Data waits for the pool's minimum before streaming; actors fall back to CPU).
"""

import time

import pytest

from cluster import ray_runtime
from tests.support.inputs import rng_image
from pipelines.upscale.job import UpscaleJob
from pipelines.upscale.manifest import read_manifest
from pipelines.upscale.pools import plan_pools
from pipelines.upscale.run import check_paths_reach_nodes, run_upscale
from srmodel import get_preset

pytestmark = pytest.mark.slow  # Ray's real scheduler with logical GPUs

STORAGE = UpscaleJob.model_fields["storage"].default


def tiny_job(src="/in", dst="/out", **resources) -> UpscaleJob:
    m = get_preset("tiny").model_dump(mode="json")
    m["sampler"].update(steps=2)
    return UpscaleJob.model_validate({"src": str(src), "dst": str(dst), "model": m, "manifest_rows_per_file": 2,
                                      "actor_start_timeout_s": 600,
                                      "resources": {"sr_batch": 1, "io_batch": 2, **resources}})


def place(requests: list[tuple[float, float]], wait_s: float = 300, until: float | None = None,
          settle_s: float = 0) -> tuple[float, float]:
    """Create one actor per (gpus, cpus) request, in the given order. Returns (GPU granted, GPU asked for).

    Waits until `until` GPUs (default: all asked for) are granted or `wait_s` passes (a busy machine
    starts worker processes slowly), then `settle_s` more, and reads the granted total again.
    """
    import ray

    @ray.remote
    class Slot:
        def ready(self):
            return True

    total = ray.cluster_resources()["GPU"]
    asked = round(sum(g for g, _ in requests), 4)
    deadline = time.time() + wait_s
    actors, expect = [], 0.0
    for g, c in requests:
        # One at a time, each placed before the next is asked for: Ray packs a fractional GPU actor onto the
        # fullest GPU that fits in the order requests reach it, and requests sent back to back on a busy
        # machine can reach it in another order (seen once in CI).
        actors.append(Slot.options(num_gpus=g, num_cpus=c).remote())
        expect = round(expect + g, 4)
        wait_one = min(deadline, time.time() + 15)
        while time.time() < wait_one and round(total - ray.available_resources().get("GPU", 0.0), 4) < expect:
            time.sleep(0.2)
    granted = 0.0
    while time.time() < deadline:
        granted = round(total - ray.available_resources().get("GPU", 0.0), 4)
        if granted >= (until or asked):
            break
        time.sleep(0.5)
    time.sleep(settle_s)
    granted = round(total - ray.available_resources().get("GPU", 0.0), 4)
    shape = sorted(int(n.gpus) for n in ray_runtime.alive_nodes() if n.gpus)
    print(f"\nplacement: nodes {shape} GPUs, {len(requests)} actors asked {asked:g} GPU, granted {granted:g}")
    for a in actors:
        ray.kill(a)
    while time.time() < deadline + 30 and ray.available_resources().get("GPU", 0.0) < total:
        time.sleep(0.5)  # resources back before the next round
    return granted, asked


def requests_of(plan: dict) -> list[tuple[float, float]]:
    sem = [(plan["semantic_gpus"], plan["semantic_cpus"])] * plan["semantic_actors"]
    return sem + [(plan["sr_gpus"], plan["sr_cpus"])] * plan["sr_actors"]  # semantic first: the worst order


@pytest.fixture(scope="module")
def one_node_8_gpus():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=12, num_gpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_one_8_gpu_node_places_every_planned_actor_and_the_old_plan_did_not(one_node_8_gpus):
    nodes = ray_runtime.alive_nodes()
    assert [(n.gpus, n.cpus) for n in nodes] == [(8, 12)]
    # The old default: 8 SR x 0.75 + 2 semantic x 0.25. Both 0.25s land on GPU 0 and one SR never places.
    assert place([(0.25, 0.5)] * 2 + [(0.75, 1)] * 8, until=5.75, settle_s=10) == (5.75, 6.5)
    fused = plan_pools(tiny_job(), nodes=nodes)
    assert fused["sr_actors"] == 8 and place(requests_of(fused)) == (8, 8)
    split = plan_pools(tiny_job(layout="split"), nodes=nodes)
    assert (split["sr_actors"], split["semantic_actors"]) == (8, 1)
    granted, asked = place(requests_of(split))
    assert granted == asked == 8 * split["sr_gpus"] + split["semantic_gpus"]


def test_node_types_published_by_an_autoscaler_are_read_and_planned(one_node_8_gpus, tmp_path, tiny_cache):
    """What KubeRay's / the launcher's autoscaler publishes in the GCS (a ClusterConfig): read back, planned."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.name, group.min_count, group.max_count = "gpu", 0, 4
    group.resources.update({"CPU": 32, "GPU": 8})
    namespace = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode()
    assert ray_runtime.autoscaling_node_types() == [] and not ray_runtime.spans_machines()
    check_paths_reach_nodes(tiny_job("/data/in", "/data/out"))  # one machine: local paths are fine
    _internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=namespace)
    try:
        (shape,) = ray_runtime.autoscaling_node_types()
        assert (shape.gpus, shape.cpus, shape.count, shape.autoscaled) == (8, 32, 4, True)
        assert ray_runtime.spans_machines(), "an autoscaler may add other machines"
        with pytest.raises(ValueError, match="SRC /data/in, DST /data/out: a local path on a multi-node"):
            check_paths_reach_nodes(tiny_job("/data/in", "/data/out"))
        check_paths_reach_nodes(tiny_job("s3://bucket/in", "s3://bucket/out"))
        check_paths_reach_nodes(UpscaleJob.model_validate({**tiny_job("/data/in", "/data/out").model_dump(),
                                                           "shared_fs": True}))
        plan = plan_pools(tiny_job(), nodes=ray_runtime.alive_nodes(), autoscale=[shape], todo=1000)
        # Starts on what is there; may grow to the group's 4 x 8 GPUs (max_count counts nodes already up).
        assert (plan["sr_actors"], plan["sr_actors_max"]) == (8, 32)
        assert plan["cpus_max"] == 4 * 32, "IO tasks are sized for the node types at their max count"
        # Issue 19: a cold GPU node gets the longer start timeout. (A fixed count of actors is already asked of
        # the autoscaler up front: the pool's min_size creates them all at once, pending actors are its demand.)
        src = tmp_path / "in"
        src.mkdir()
        rng_image(8, 8).save(src / "a.png")
        job = UpscaleJob.model_validate({**tiny_job(src, tmp_path / "out", sr_actors=2).model_dump(),
                                         "shared_fs": True, "actor_start_timeout_s": None})
        summary = run_upscale(job)
        assert summary["by_status"] == {"ok": 1}
        assert summary["pools"]["sr_actors"] == summary["pools"]["sr_actors_max"] == 2
        import ray.data

        ctx = ray.data.DataContext.get_current()
        assert ctx.wait_for_min_actors_s == 1800
        # Ray Data's 30-minute no-progress abort would end a healthy run whose one actor takes two batches at
        # the time budget: the start timeout plus that (sr_batch 1, time_budget_s 1800).
        assert ctx.execution_no_progress_timeout_s == 1800 + 2 * 1 * 1800
    finally:
        _internal_kv_del(key, namespace=namespace)
    assert ray_runtime.autoscaling_node_types() == []


@pytest.fixture
def mixed_cluster(tiny_cache):
    """A CPU head and worker nodes of 1, 2 and 8 logical GPUs (CPUs to spare: GPU shares are what is tested)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    for gpus in (1, 2, 8):
        c.add_node(num_cpus=2 * gpus + 2, num_gpus=gpus)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def test_tiny_job_on_nodes_of_1_2_and_8_gpus_starts_every_planned_actor(mixed_cluster, tmp_path):
    nodes = ray_runtime.alive_nodes()
    assert sorted(n.gpus for n in nodes) == [0, 1, 2, 8]
    split = plan_pools(tiny_job(layout="split"), nodes=nodes)
    assert (split["sr_actors"], split["semantic_actors"]) == (11, 2) and split["sr_gpus"] > 8 / 9
    granted, asked = place(requests_of(split))
    assert granted == asked, "every planned actor placed, semantic actors first"
    src = tmp_path / "src"
    src.mkdir()
    for k in range(6):
        rng_image(16, 12, k).save(src / f"{k}.png")
    summary = run_upscale(tiny_job(src, tmp_path / "out"))
    # Ray Data starts the pool's minimum (all 11 planned actors) before streaming, or fails after the timeout.
    assert summary["pools"]["sr_actors"] == summary["pools"]["sr_actors_max"] == 11
    assert summary["by_status"] == {"ok": 6}
    print(f"\nplacement: tiny job on nodes [1, 2, 8] GPUs: {summary['pools']['sr_actors']} fused actors planned, "
          f"all started; {summary['wall_s']} s")
    rows = read_manifest(str(tmp_path / "out"), STORAGE).to_pylist()
    assert len({r["image_id"] for r in rows}) == 6

