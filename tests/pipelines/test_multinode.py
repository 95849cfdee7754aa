"""Multi-node: the job spread over a ray.cluster_utils.Cluster, and a worker node removed mid-run."""

import threading
from pathlib import Path

import pytest

from tests.support.inputs import rng_image
from pipelines.upscale.job import UpscaleJob
from pipelines.upscale.manifest import read_manifest
from pipelines.upscale.run import run_upscale
from srmodel import get_preset

pytestmark = pytest.mark.slow  # a multi-node ray.cluster_utils.Cluster

STORAGE = UpscaleJob.model_fields["storage"].default


@pytest.fixture
def cluster(tiny_cache):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    workers = [c.add_node(num_cpus=4) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()


def job(src, dst):
    m = get_preset("tiny").model_dump(mode="json")
    m["sampler"].update(steps=3)
    return UpscaleJob.model_validate({
        "src": str(src), "dst": str(dst), "model": m, "manifest_rows_per_file": 2,
        "resources": {"sr_actors": 2, "sr_batch": 2, "io_batch": 2, "semantic_batch": 2},
    })


def test_worker_node_removed_mid_run(cluster, tmp_path):
    import ray

    c, workers = cluster
    src = tmp_path / "src"
    src.mkdir()
    for k in range(12):
        rng_image(16, 12, k).save(src / f"{k:02d}.png")
    dst = tmp_path / "out"
    some_rows = threading.Event()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("s", run_upscale(job(src, dst), on_progress=lambda *_: some_rows.set())))
    thread.start()
    assert some_rows.wait(300)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    c.remove_node(workers[0])  # its actors and in-flight tasks die with it
    thread.join(600)
    assert not thread.is_alive()
    assert result["s"]["by_status"] == {"ok": 12}
    rows = read_manifest(str(dst), STORAGE).to_pylist()
    assert len(rows) == 12 and len({r["image_id"] for r in rows}) == 12
    assert all(Path(r["dst_uri"].removeprefix("file://")).is_file() for r in rows)
    assert len({r["node_id"] for r in rows}) >= 1
