"""Issue 9 without a cluster: pool plans per node shape, the DST lease, weights staged from S3, job ids."""

import json
import os
import threading
import time

import numpy as np
import pytest
from tests.support.inputs import rng_image

from actors.staging import stage_source
from cluster import jobs, ray_runtime, weights
from cluster.lease import DstLease, LeaseHeld, LeaseLost, check_lease
from cluster.ray_runtime import NodeShape
from cluster.storage import StorageConfig
from tests.support.cluster_helpers import upload_folder
from pipelines.upscale.job import UpscaleJob
from pipelines.upscale.pools import plan_pools
from srmodel import get_preset
from srmodel.config import ModelSource
from srmodel.tiny import released_tiny_source


def job(preset="tiny", **kw) -> UpscaleJob:
    source = ModelSource(sd_base="/w/sd", seesr="/w/ck", sam2_checkpoint="/w/sam.pt") if preset != "tiny" else None
    return UpscaleJob.model_validate({"src": "/in", "dst": "/out", "model": get_preset(preset, source).model_dump(mode="json"),
                                      **kw})


def gpu_node(gpus, cpus=None):
    return NodeShape(cpus=float(cpus if cpus is not None else 2 * gpus + 4), gpus=float(gpus))


HEAD = NodeShape(cpus=4.0, gpus=0.0)


@pytest.mark.parametrize("shape", [[1], [2], [4], [8], [1, 2, 8], [8, 8], [4, 1]])
def test_fused_plan_is_one_whole_gpu_actor_per_gpu_on_every_shape(shape):
    plan = plan_pools(job(), nodes=[HEAD, *map(gpu_node, shape)])
    assert plan["layout"] == "fused" and plan["sr_gpus"] == 1 and plan["semantic_actors"] == 0
    assert plan["sr_actors"] == plan["sr_actors_max"] == sum(shape)


@pytest.mark.parametrize("shape", [[1], [2], [4], [8], [1, 2, 8], [8] * 3])
def test_split_plan_shares_pack_in_any_order(shape):
    plan = plan_pools(job(resources={"layout": "split"}), nodes=[HEAD, *map(gpu_node, shape)])
    s, t, n_sem = plan["sr_gpus"], plan["semantic_gpus"], plan["semantic_actors"]
    assert n_sem == max(1, -(-sum(shape) // 8))
    biggest = max(shape)
    assert s + n_sem * t <= 1 + 1e-9 and biggest * (1 - s) < s, "the two conditions that make every creation order place"
    assert plan["sr_actors"] == sum(shape)


def test_split_shares_that_may_not_pack_are_refused():
    # The old default: 8 SR x 0.75 + 2 semantic x 0.25 on one 8-GPU node (two 0.25s on one GPU block an SR actor).
    with pytest.raises(ValueError, match="may not place in every order"):
        plan_pools(job(resources={"layout": "split", "semantic_actors": 2, "sr_gpus": 0.75, "semantic_gpus": 0.25}),
                   nodes=[gpu_node(8)])
    # The first split default, 11 SR x 0.6 + 2 x 0.2 on nodes of 1, 2 and 8 GPUs: a 2-GPU node with two SR
    # actors shows 0.8 GPU free in sum (Ray's view of a remote node), so a third SR actor may wait there.
    with pytest.raises(ValueError, match=r"sr_gpus > 8/9"):
        plan_pools(job(resources={"layout": "split", "sr_gpus": 0.6, "semantic_gpus": 0.2}),
                   nodes=[HEAD, gpu_node(1), gpu_node(2), gpu_node(8)])


def test_plan_counts_cpus_per_node_and_keeps_io_slots():
    # 8 GPUs but 4 CPUs: only 4 one-CPU actors fit, and one CPU slot is kept for read/write tasks.
    plan = plan_pools(job(), nodes=[gpu_node(8, cpus=4)])
    assert plan["sr_actors"] == 3
    with pytest.raises(ValueError, match="ask for 6 SR actors"):
        plan_pools(job(resources={"sr_actors": 6}), nodes=[gpu_node(4)])


def test_autoscaling_pool_starts_small_and_may_grow_to_the_node_types():
    group = NodeShape(cpus=32.0, gpus=8.0, count=4, autoscaled=True)
    plan = plan_pools(job(preset="wild"), nodes=[HEAD], autoscale=[group])
    assert (plan["sr_actors"], plan["sr_actors_max"], plan["sr_gpus"]) == (1, 32, 1), "one GPU actor asks for a node"
    few = plan_pools(job(preset="wild"), nodes=[HEAD, gpu_node(8)], autoscale=[group], todo=100)
    assert (few["sr_actors"], few["sr_actors_max"]) == (8, 13), "never more actors than batches of work"
    capped = plan_pools(job(preset="wild", resources={"sr_actors_max": 4}), nodes=[HEAD], autoscale=[group])
    assert capped["sr_actors_max"] == 4


def test_io_tasks_are_sized_for_the_cluster_at_its_largest_not_at_start(monkeypatch):
    """Issue 19: read/write caps came from the CPUs up at start (the head's, on a cluster that scales from zero)
    and held for the whole run, so Ray Data's autoscaling requests never grew past them."""
    from pipelines.upscale.run import MAX_IO_TASKS, io_sizes

    monkeypatch.setattr(ray_runtime, "cluster_cpus", lambda: HEAD.cpus)
    groups = [NodeShape(cpus=32.0, gpus=8.0, count=4, autoscaled=True), NodeShape(cpus=16.0, gpus=0.0, count=8,
                                                                                     autoscaled=True)]
    start = plan_pools(job(preset="wild"), nodes=[HEAD, gpu_node(8)])
    grown = plan_pools(job(preset="wild"), nodes=[HEAD], autoscale=groups)
    assert grown["cpus_max"] == 4 * 32 + 8 * 16
    reads0, writes0 = io_sizes(job(preset="wild"), start, todo=10**6)
    reads, writes = io_sizes(job(preset="wild"), grown, todo=10**6)
    assert reads > 4 * reads0 and writes > 4 * writes0, (reads0, writes0, reads, writes)
    r = job(preset="wild").resources
    assert io_sizes(job(preset="wild"), grown, todo=3) == (-(-3 // r.io_batch), -(-3 // r.sr_batch)), \
        "never more tasks than batches of work"
    unbounded = plan_pools(job(preset="wild"), nodes=[HEAD], autoscale=[NodeShape(cpus=32.0, gpus=8.0, count=1000,
                                                                                   autoscaled=True)])
    assert max(io_sizes(job(preset="wild"), unbounded, todo=10**8)) == MAX_IO_TASKS


def test_real_weights_without_any_gpu_are_refused_unless_allowed():
    with pytest.raises(ValueError, match="--allow-cpu"):
        plan_pools(job(preset="wild"), nodes=[HEAD])
    cpu = plan_pools(job(preset="wild", allow_cpu=True), nodes=[HEAD])
    assert cpu["sr_gpus"] == 0 and cpu["sr_actors"] == 1
    assert plan_pools(job(), nodes=[HEAD])["sr_gpus"] == 0, "tiny runs on CPU without asking"


def test_connect_rule(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_runtime.target(None) is None, "no address, no RAY_ADDRESS: embedded local Ray"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_runtime.target(None) == "10.0.0.1:6379", "a Ray job's entrypoint joins its cluster"
    assert ray_runtime.target("ray://head:10001") == "ray://head:10001", "an explicit address wins"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # set for `ugcsr submit`: not for ray.init
    with pytest.raises(ValueError, match="ugcsr submit"):
        ray_runtime.connect(None)


# ---------------------------------------------------------------- the DST lease

def _lease_roundtrip(dst, storage):
    first = DstLease(dst, storage, owner="alice@box pid 1")
    first.acquire()
    with pytest.raises(LeaseHeld, match="alice@box pid 1"):
        DstLease(dst, storage, owner="bob").acquire()
    first.release()
    with DstLease(dst, storage, owner="bob") as second:  # free again after release
        assert second.token
    # A run that died: its lease is not renewed and expires; the next run takes it over conditionally.
    dead = DstLease(dst, storage, ttl_s=1.0, owner="dead run")
    dead.acquire()
    dead._stop.set()
    time.sleep(2.2)  # past its ttl by the store's clock (S3 dates are whole seconds)
    heir = DstLease(dst, storage, owner="heir")
    heir.acquire()
    dead.renew()
    assert dead.lost, "the old owner notices it lost the lease"
    dead.release()  # must not delete the heir's lease
    with pytest.raises(LeaseHeld, match="heir"):
        DstLease(dst, storage, owner="third").acquire()
    heir.release()


def test_a_run_that_lost_the_lease_is_fenced(tmp_path, monkeypatch):
    """Taken over, or not renewed for ttl minus a margin: the driver's check and every writer's refuse."""
    dst, storage = str(tmp_path / "dst"), StorageConfig()
    mine = DstLease(dst, storage, owner="first run")
    mine.acquire()
    mine._stop.set()  # renewals by hand below
    check_lease(dst, storage, **mine.fence)  # still ours: writers go on
    mine.check()
    lease_file = tmp_path / "dst/_state/lease.json"
    record = json.loads(lease_file.read_text())
    lease_file.write_text(json.dumps({**record, "owner": "second run", "run_id": "other"}))  # taken over
    with pytest.raises(LeaseLost, match="second run"):
        check_lease(dst, storage, **mine.fence)
    mine.renew()
    with pytest.raises(LeaseLost):
        mine.check()
    mine.release()
    assert json.loads(lease_file.read_text())["owner"] == "second run", "the loser deletes nothing"
    lease_file.unlink()
    # Renewals failing (the store unreachable) for 3/4 of the ttl: the run stops itself.
    stuck = DstLease(dst, storage, ttl_s=120, owner="stuck run")
    stuck.acquire()
    stuck._stop.set()
    stuck.check()
    monkeypatch.setattr(stuck, "renewed_at", stuck.renewed_at - 91)
    with pytest.raises(LeaseLost, match="not renewed in time"):
        stuck.check()
    # A writer sees a lease unrenewed past its ttl by the store's clock (the file's mtime) as lost too.
    old = time.time() - 200
    os.utime(lease_file, (old, old))
    with pytest.raises(LeaseLost, match="not renewed for 20[0-9] s"):
        check_lease(dst, storage, **stuck.fence)
    with DstLease(dst, storage, owner="next run"):  # and the next run takes it over
        pass


def test_lease_expiry_is_judged_by_the_stores_clock(tmp_path, s3, s3_endpoint):
    """A holder whose clock runs 3 minutes behind still holds a fresh lease; an expiry written far in the
    future does not block runs once the lease went unrenewed, and the message gives the full date."""
    s3.create_bucket(Bucket="skew")
    storage = StorageConfig(endpoint_url=s3_endpoint)
    now = time.time()
    behind = {"owner": "slow clock", "run_id": "r1", "acquired_at": now - 180, "expires_at": now - 60,
              "space": "", "pid": 0, "ttl_s": 120}
    s3.put_object(Bucket="skew", Key="dst/_state/lease.json", Body=json.dumps(behind).encode())
    with pytest.raises(LeaseHeld, match="slow clock"):
        DstLease("s3://skew/dst", storage, owner="me").acquire()
    far = {**behind, "owner": "far future", "expires_at": 4102444800.0}  # 2100-01-01
    lease_file = tmp_path / "dst/_state/lease.json"
    lease_file.parent.mkdir(parents=True)
    lease_file.write_text(json.dumps(far))
    with pytest.raises(LeaseHeld, match="2100-01-01 00:00:00 UTC"):
        DstLease(str(tmp_path / "dst"), owner="me").acquire()
    old = time.time() - 300
    os.utime(lease_file, (old, old))  # unrenewed for 5 minutes by the store's clock
    with DstLease(str(tmp_path / "dst"), owner="me"):
        pass


def test_lease_of_a_killed_driver_on_this_machine_is_taken_over_at_once(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = DstLease(str(tmp_path / "dst"), owner="killed driver")
    gone.acquire()
    gone._stop.set()
    record = json.loads((tmp_path / "dst/_state/lease.json").read_text())
    assert record["pid"] == os.getpid()
    record["pid"] = int(dead.stdout)  # as if the driver had been that (now ended) process
    (tmp_path / "dst/_state/lease.json").write_text(json.dumps(record))
    with DstLease(str(tmp_path / "dst"), owner="rerun"):
        pass  # not refused although the dead driver's lease had not expired


def test_lease_on_a_local_folder(tmp_path):
    _lease_roundtrip(str(tmp_path / "dst"), StorageConfig())
    assert not (tmp_path / "dst" / "_state" / "lease.json").exists()


def test_lease_on_s3_uses_conditional_writes(s3, s3_endpoint):
    s3.create_bucket(Bucket="out")
    storage = StorageConfig(endpoint_url=s3_endpoint)
    _lease_roundtrip("s3://out/dst", storage)
    # Two runs racing for a free DST: exactly one wins.
    results = []
    barrier = threading.Barrier(4)

    def race(i):
        barrier.wait()
        try:
            results.append(DstLease("s3://out/race", storage, owner=f"run {i}").acquire())
        except LeaseHeld:
            results.append(None)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sum(r is not None for r in results) == 1


def test_second_run_on_a_leased_dst_fails_before_starting_anything(tiny_cache, tmp_path):
    from pipelines.upscale.run import run_upscale

    dst = tmp_path / "out"
    (tmp_path / "in").mkdir()
    holder = DstLease(str(dst), owner="Ray job ugcsr-upscale-0123456789ab")
    holder.acquire()
    try:
        with pytest.raises(LeaseHeld, match="ugcsr-upscale-0123456789ab"):
            run_upscale(job(src=str(tmp_path / "in"), dst=str(dst)))
    finally:
        holder.release()


# ---------------------------------------------------------------- weights from object storage

@pytest.fixture
def tiny_on_s3(s3, s3_endpoint, released_tiny):
    upload_folder(s3, released_tiny, "weights", "tiny")
    return released_tiny_source("s3://weights/tiny"), StorageConfig(endpoint_url=s3_endpoint)


def test_weights_are_staged_once_per_node_and_reused(tiny_on_s3, tmp_path, monkeypatch, s3):
    source, storage = tiny_on_s3
    calls = []
    real = weights._download
    monkeypatch.setattr(weights, "_download", lambda uri, *a: (calls.append(uri), real(uri, *a)))
    cache = tmp_path / "staged"
    out = []
    threads = [threading.Thread(target=lambda: out.append(stage_source(source, storage, cache))) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(out) == 3 and out[0] == out[1] == out[2]
    assert sorted(calls) == sorted(weights.remote_uris(source.paths()).values()), "each object downloaded once"
    local = out[0]
    assert weights.remote_uris(local.paths()) == {} and local.sd_base.startswith(str(cache))
    assert (np.fromfile(local.sam2_checkpoint, np.uint8).size
            == s3.head_object(Bucket="weights", Key="tiny/sam2.1_hiera_tiny.pt")["ContentLength"])
    calls.clear()
    stage_source(source, storage, cache)
    assert calls == [], "a later run reuses the staged copy"
    s3.put_object(Bucket="weights", Key="tiny/DAPE.pth", Body=b"changed")
    again = stage_source(source, storage, cache)
    assert calls == ["s3://weights/tiny/DAPE.pth"], "only the object that changed is fetched again"
    assert open(again.dape, "rb").read() == b"changed"


def test_missing_weights_fail_at_start_naming_the_uri(tiny_on_s3):
    source, storage = tiny_on_s3
    broken = source.model_copy(update={"seesr": "s3://weights/tiny/checkpoint-nope"})
    with pytest.raises(FileNotFoundError, match="s3://weights/tiny/checkpoint-nope"):
        weights.check_uris(broken.paths(), storage)


def test_an_actor_loads_weights_from_s3(tiny_on_s3, monkeypatch, tmp_path):
    from actors.fused import SemanticSRStage

    source, storage = tiny_on_s3
    monkeypatch.setenv("UGCSR_CACHE", str(tmp_path / "cache"))
    model = get_preset("tiny", source).model_dump(mode="json")
    model["sampler"]["steps"] = 1
    stage = SemanticSRStage(model, device="cpu", storage=storage.model_dump())
    assert stage.sr.config.source.seesr.startswith(str(tmp_path / "cache" / "staged"))
    out = stage({"image_id": ["a"], "image": [np.full((16, 16, 3), 128, np.uint8)]})
    assert out["error_type"] == [""] and out["sr_image"][0].shape == (64, 64, 3)


# ---------------------------------------------------------------- Ray Jobs: ids, runtime_env

def test_submission_id_is_derived_from_the_settings(tmp_path):
    a = jobs.submission_base("upscale", {"src": "s3://a", "dst": "s3://b", "limit": None}, {})
    assert a == jobs.submission_base("upscale", {"limit": None, "dst": "s3://b", "src": "s3://a"}, {})
    assert a != jobs.submission_base("upscale", {"src": "s3://a", "dst": "s3://c", "limit": None}, {})
    assert a != jobs.submission_base("upscale", {"src": "s3://a", "dst": "s3://b", "limit": None},
                                     {"AWS_ENDPOINT_URL": "http://minio:9000"})
    cfg = tmp_path / "job.yaml"
    cfg.write_text("format: webp\n")
    b = jobs.submission_base("upscale", {"config": cfg}, {})
    cfg.write_text("format: jpeg\n")
    assert b != jobs.submission_base("upscale", {"config": cfg}, {}), "a config file counts by its content"
    assert jobs.ID_PATTERN.match(a) and jobs.ID_PATTERN.match(a + "-r2")


def test_attempts_of_one_job_get_the_next_id():
    from ray.job_submission import JobDetails, JobStatus, JobType

    def details(sid, status):
        return JobDetails(type=JobType.SUBMISSION, submission_id=sid, status=status, entrypoint="x")

    base = "ugcsr-upscale-0123456789ab"
    listed = [details(base + "-r2", JobStatus.FAILED), details("other", JobStatus.RUNNING),
              details(base, JobStatus.SUCCEEDED), details("ugcsr-upscale-ffffffffffff", JobStatus.RUNNING)]
    fam = jobs.family(listed, base)
    assert [j.submission_id for j in fam] == [base, base + "-r2"]
    assert jobs.next_id(base, fam) == base + "-r3" and jobs.next_id(base, []) == base


def test_runtime_env_ships_code_and_store_settings_never_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    env = jobs.storage_env({"HF_HUB_OFFLINE": "1"})
    assert env == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1"}
    with pytest.raises(ValueError, match="secrets"):
        jobs.storage_env({"AWS_SESSION_TOKEN": "x"})
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("format: webp\n")
    prep = jobs.prepare("upscale", ["s3://a", "s3://b", "--config", str(cfg)], env, "ugcsr-upscale-x", cfg)
    try:
        assert prep.entrypoint == "python -m pipelines.cli upscale s3://a s3://b --config job.yaml"
        assert (tmp_path / "mine.yaml").read_text() == open(f"{prep.workdir}/job.yaml").read()
        assert prep.runtime_env["env_vars"]["UGCSR_SUBMISSION_ID"] == "ugcsr-upscale-x"
        assert "hunter2" not in json.dumps(prep.runtime_env)
        assert [p.rsplit("/", 1)[-1] for p in prep.runtime_env["py_modules"]] == list(jobs.PACKAGES)
    finally:
        import shutil

        shutil.rmtree(prep.workdir)


def test_submit_checks_the_programs_options_before_contacting_a_cluster(monkeypatch):
    from typer.testing import CliRunner

    from pipelines.cli import app

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    res = CliRunner().invoke(app, ["submit", "--", "upscale", "s3://a", "s3://b", "--no-such-flag"])
    assert res.exit_code == 2 and "no-such-flag" in res.output
    res = CliRunner().invoke(app, ["submit", "--", "upscale", "s3://a", "s3://b"])
    assert res.exit_code == 2 and "--address" in res.output, "no cluster given: says how to give one"
    res = CliRunner().invoke(app, ["submit", "--", "rm", "-rf"])
    assert res.exit_code == 2 and "cannot submit 'rm'" in res.output


@pytest.mark.slow  # writes the released layout and runs the CLI
def test_weights_folder_in_the_released_layout_is_accepted(released_tiny, tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    for part in ("stable-diffusion-2-base", "checkpoint-90000", "sam2.1_hiera_tiny.pt", "ram_swin_large_14m.pth", "DAPE.pth"):
        assert (released_tiny / part).exists(), part
    (tmp_path / "in").mkdir()
    rng_image(16, 16, 0).save(tmp_path / "in" / "a.png")  # an empty SRC is an error of its own
    res = CliRunner().invoke(app, ["upscale", str(tmp_path / "in"), str(tmp_path / "out"), "--preset", "tiny",
                                   "--weights", str(released_tiny), "--dry-run"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["upscale", str(tmp_path / "in"), str(tmp_path / "out"), "--preset", "wild",
                                   "--weights", str(tmp_path / "nothing"), "--dry-run"])
    flat = "".join(res.output.replace("│", "").split())  # rich wraps the message in a box
    assert res.exit_code == 2 and "stable-diffusion-2-baseismissing" in flat


def test_train_workers_reserve_the_measured_host_memory_on_gpu_clusters(tmp_path):
    """The real-size worker's load peak plus 25 % (docs/performance.md) on GPUs; nothing on CPU or for tiny;
    `memory_gb` overrides."""
    from pipelines.train.driver import worker_resources
    from pipelines.train.job import TRAIN_WORKER_MEMORY_GB, TrainJob
    from srmodel.presets import get_preset

    data = {"trainset": str(tmp_path / "ts"), "run": str(tmp_path / "run"), "max_steps": 2,
            "model": get_preset("tiny").model_dump(mode="json")}
    job = TrainJob.model_validate(data)
    assert TRAIN_WORKER_MEMORY_GB == 12.0
    assert worker_resources(job, 1.0, "synthetic") == {"CPU": 1.0, "GPU": 1.0, "memory": 12 * 2**30}
    assert worker_resources(job, 0.0, "synthetic") == {"CPU": 1.0}
    assert worker_resources(job, 1.0, "tiny") == {"CPU": 1.0, "GPU": 1.0}
    pinned = TrainJob.model_validate({**data, "memory_gb": 20})
    assert worker_resources(pinned, 1.0, "tiny")["memory"] == 20 * 2**30
