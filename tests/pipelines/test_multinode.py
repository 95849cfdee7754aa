"""Multi-node: the job spread over a ray.cluster_utils.Cluster whose GPUs are all in use, and a worker node removed
mid-run."""

import sys
import threading
from pathlib import Path

import pytest
from ray import cloudpickle

from actors.fused import SemanticSRStage

from tests.support.inputs import rng_image
from pipelines.upscale.job import UpscaleJob
from pipelines.upscale.manifest import read_manifest
from pipelines.upscale.run import run_upscale
from srmodel import get_preset

pytestmark = pytest.mark.slow  # a multi-node ray.cluster_utils.Cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the broken stage below travels to the workers

STORAGE = UpscaleJob.model_fields["storage"].default


def job(src, dst):
    m = get_preset("tiny").model_dump(mode="json")
    m["sampler"].update(steps=3)
    return UpscaleJob.model_validate({
        "src": str(src), "dst": str(dst), "model": m, "manifest_rows_per_file": 2,
        "resources": {"sr_actors": 2, "sr_batch": 2, "io_batch": 2, "semantic_batch": 2},
    })


@pytest.fixture(scope="module")
def gpu_cluster(tiny_cache):
    """Two worker nodes of one (logical) GPU each: both SR actors hold every GPU there is. Shared by the tests
    below, in order (the last one removes a node)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    workers = [c.add_node(num_cpus=3, num_gpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()


BROKEN = {}  # {"node_file": path} naming the node whose GPU is broken


def _on_broken_node() -> bool:
    import ray

    return ray.get_runtime_context().get_node_id() == Path(BROKEN["node_file"]).read_text()


class BrokenGpuStage(SemanticSRStage):
    """The real fused stage, but on the broken node its GPU fails as the model loads (an uncorrectable ECC error:
    torch raises it as a CUDA error)."""

    def __init__(self, **kwargs):
        if _on_broken_node():
            raise RuntimeError("CUDA error: uncorrectable ECC error encountered")
        super().__init__(**kwargs)


def test_a_gpu_broken_from_the_start_is_quarantined_and_the_run_goes_on_without_its_node(gpu_cluster, tmp_path,
                                                                                        monkeypatch):
    """Ray Data fails an execution whose pool cannot start; the run quarantines the GPU, plans the execution again
    without its node (one SR actor), and every later execution too: every image done, none blamed."""
    import pipelines.upscale.run as run_module

    c, workers = gpu_cluster
    (tmp_path / "bad").write_text(workers[0].node_id)
    BROKEN["node_file"] = str(tmp_path / "bad")
    monkeypatch.setattr(run_module, "SemanticSRStage", BrokenGpuStage)
    src = tmp_path / "src"
    src.mkdir()
    for k in range(16):
        rng_image(16, 12, k).save(src / f"{k:02d}.png")
    j = job(src, tmp_path / "out").model_copy(update={"plan_buckets": 4, "execution_images": 8})
    s = run_upscale(j)
    assert s["executions"] >= 2 and [q["node"] for q in s["gpus_quarantined"]] == [workers[0].node_id]
    assert "loading the model" in s["gpus_quarantined"][0]["last_error"]
    assert s["by_status"] == {"ok": 16} and s["unaccounted"] == 0


def test_a_lost_node_with_every_gpu_in_use_still_finishes_every_image(gpu_cluster, tmp_path):
    """The lost node's actor cannot restart while the other holds the only GPU left; once the other has done the
    rest, Ray Data releases it and the restart takes its GPU: its batches finish in the same run, no hang."""
    c, workers = gpu_cluster
    src = tmp_path / "src"
    src.mkdir()
    for k in range(24):
        rng_image(16, 12, k).save(src / f"{k:02d}.png")
    dst = tmp_path / "out"
    some_rows = threading.Event()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("s", run_upscale(job(src, dst), on_progress=lambda *_: some_rows.set())))
    thread.start()
    assert some_rows.wait(300)
    c.remove_node(workers[0])
    thread.join(300)
    assert not thread.is_alive()
    s = result["s"]
    assert s["pools"]["sr_gpus"] == 1 and s["pools"]["sr_actors"] == 2, "every GPU held by an SR actor"
    assert s["by_status"] == {"ok": 24} and s["unaccounted"] == 0 and s["gpus_quarantined"] == []
    rows = read_manifest(str(dst), STORAGE).to_pylist()
    assert len(rows) == 24 and len({r["image_id"] for r in rows}) == 24
    assert all(Path(r["dst_uri"].removeprefix("file://")).is_file() for r in rows)
