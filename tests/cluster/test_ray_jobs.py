"""End to end through the Ray Jobs API: `ray start --head` on loopback, `ugcsr submit` of a tiny upscale
from one S3 bucket to another with the weights on S3, a second identical submit that attaches, the job
commands; the head is stopped by this test (its own processes only)."""

import io
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from cluster.storage import StorageConfig
from tests.support.cluster_helpers import upload_folder
from tests.support.ports import free_port
from tests.support.inputs import rng_image
from pipelines.upscale.manifest import read_manifest

pytestmark = pytest.mark.slow  # `ray start --head` and the Jobs API

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def running_head(tmp_path, *, one_machine: bool = True):
    """A Ray head with its dashboard (Jobs API) on 127.0.0.1, every port chosen free; yields (address, env, gcs port).

    one_machine: Ray's single-machine mode (its GCS listens on 127.0.0.1 only, no other node may join);
    otherwise nodes started with `ray start --address` on this machine may join it."""
    import psutil

    ports = {name: free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "metrics-export-port",
                                            "runtime-env-agent-port", "ray-client-server-port",
                                            "node-manager-port", "object-manager-port")}
    env = {**os.environ,
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),  # this head's own token
           "UGCSR_CACHE": str(tmp_path / "node-cache"),  # where the node stages the weights
           "PYTHONPATH": str(ROOT)}
    if one_machine:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # a one-machine Ray: node address 127.0.0.1, not the NIC's
    temp = tempfile.mkdtemp(prefix="ugcsr-ray-", dir="/tmp")  # short: Ray's Unix socket paths have a limit
    log = open(tmp_path / "head.log", "wb")
    cmd = [shutil.which("ray") or "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4", "--num-gpus=0",
           f"--temp-dir={temp}", "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        import requests

        deadline = time.time() + 180
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            started = b"Ray runtime started" in (tmp_path / "head.log").read_bytes()  # every process of the head up
            try:
                requests.get(f"{address}/api/version", timeout=2)  # any answer (401 without the token) will do
                if started:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "the Ray head did not come up"
            time.sleep(1)
        yield address, env, ports["port"]
    finally:
        family = [head.pid] + [p.pid for p in psutil.Process(head.pid).children(recursive=True)]
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(10)  # a test head: what has not stopped by then is killed below (a graceful stop took 30 s)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        for pid in family:  # anything of this head's that left the process group
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_head(tmp_path):
    with running_head(tmp_path) as (address, env, _):
        yield address, env


@pytest.fixture
def ray_head_with_workers(tmp_path):
    """A head plus two worker nodes (`ray start --address`), each with its own ports and its own weights cache
    (UGCSR_CACHE): on one machine they stand for two machines that each stage the weights."""
    with running_head(tmp_path, one_machine=False) as (address, env, gcs):
        workers = []
        try:
            for k in range(2):  # one at a time: two raylets starting at once on 2 cores missed Ray's start timeout
                ports = {name: free_port() for name in ("node-manager-port", "object-manager-port",
                                                        "metrics-export-port", "dashboard-agent-listen-port",
                                                        "dashboard-agent-grpc-port", "runtime-env-agent-port")}
                node_env = {**env, "UGCSR_CACHE": str(tmp_path / f"node-{k}-cache")}
                log = open(tmp_path / f"worker-{k}.log", "wb")
                cmd = [shutil.which("ray") or "ray", "start", "--block", f"--address=127.0.0.1:{gcs}",
                       "--node-ip-address=127.0.0.1", "--num-cpus=3", "--num-gpus=0", "--disable-usage-stats",
                       *(f"--{n}={v}" for n, v in ports.items())]
                workers.append((subprocess.Popen(cmd, env=node_env, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True), log))
                deadline = time.time() + 120
                while b"Ray runtime started" not in (tmp_path / f"worker-{k}.log").read_bytes():
                    assert workers[-1][0].poll() is None, (tmp_path / f"worker-{k}.log").read_text()[-3000:]
                    assert time.time() < deadline, f"worker node {k} did not start"
                    time.sleep(1)
            yield address, env
        finally:
            for proc, log in workers:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                log.close()


def ugcsr(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_submit_an_upscale_from_s3_to_s3_as_a_ray_job(ray_head, s3, s3_endpoint, released_tiny):
    address, env = ray_head
    env = {**env, "AWS_ENDPOINT_URL": s3_endpoint}
    env.pop("RAY_AUTH_MODE")  # the client side finds the token by itself
    s3.create_bucket(Bucket="inputs")
    s3.create_bucket(Bucket="outputs")
    for k in range(5):
        buf = io.BytesIO()
        rng_image(20, 16, k).save(buf, "PNG")
        s3.put_object(Bucket="inputs", Key=f"src/{k}.png", Body=buf.getvalue())
    upload_folder(s3, released_tiny, "weights", "tiny")
    program = ["upscale", "s3://inputs/src", "s3://outputs/dst", "--preset", "tiny", "--weights", "s3://weights/tiny"]

    t0 = time.perf_counter()
    first = ugcsr(["submit", "--address", address, "--no-wait", "--", *program], env)
    assert first.returncode == 0, first.stderr[-3000:]
    sid = first.stdout.strip().splitlines()[-1]
    assert sid.startswith("ugcsr-upscale-") and "submitted job" in first.stderr
    t_submit = time.perf_counter() - t0
    second = ugcsr(["submit", "--address", address, "--wait", "--", *program], env)
    t_job = time.perf_counter() - t0
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    said = " ".join(second.stderr.split())
    assert f"job {sid} with the same command is already running: attaching to it" in said
    assert second.stdout.splitlines()[0] == sid and f"job {sid}: SUCCEEDED" in said

    rows = read_manifest("s3://outputs/dst", StorageConfig(endpoint_url=s3_endpoint)).to_pylist()
    assert sorted(r["status"] for r in rows) == ["ok"] * 5
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="outputs", Prefix="dst/")["Contents"]}
    assert {f"dst/{k}.png" for k in range(5)} <= keys
    assert "dst/_state/lease.json" not in keys, "the lease was released at the end"

    listed = ugcsr(["jobs", "list", "--address", address], env)
    assert listed.returncode == 0 and [line.split("\t")[:2] for line in listed.stdout.splitlines()] == [[sid, "SUCCEEDED"]]
    logs = ugcsr(["jobs", "logs", sid, "--address", address], env)
    assert logs.returncode == 0
    assert "image(s) to process" in logs.stdout and '"by_status"' in logs.stdout, logs.stdout[-3000:]
    status = ugcsr(["jobs", "status", sid, "--address", address], env)
    assert status.returncode == 0 and '"status": "SUCCEEDED"' in status.stdout

    # A job that fails (no weights at that prefix): `--wait` exits non-zero, as does `jobs status`.
    t1 = time.perf_counter()
    bad = ugcsr(["submit", "--address", address, "--", "upscale", "s3://inputs/src", "s3://outputs/bad",
                 "--preset", "wild", "--weights", "s3://weights/none"], env)
    t_bad = time.perf_counter() - t1
    assert bad.returncode == 1 and "FAILED" in bad.stderr, bad.stderr[-3000:]
    assert "stable-diffusion-2-baseismissing" in "".join(bad.stdout.replace("│", "").split()), "the job's log says why"
    bad_id = bad.stdout.splitlines()[0]
    assert ugcsr(["jobs", "status", bad_id, "--address", address], env).returncode == 1
    print(f"\nRay Jobs test: first submit returned after {t_submit:.1f} s, job done after {t_job:.1f} s, "
          f"failing job reported after {t_bad:.1f} s")


def test_submit_a_training_run_on_a_cluster_of_three_nodes(ray_head_with_workers, s3, s3_endpoint, released_tiny,
                                                          tmp_path):
    """The train RayJob's entrypoint end to end: TRAINSET, RUN and weights on S3, 2 workers on a head + 2 worker
    nodes; the export it writes to S3 upscales with --seesr s3://... as a second job."""
    from tests.support.inputs import rng_image

    address, env = ray_head_with_workers
    env = {**env, "AWS_ENDPOINT_URL": s3_endpoint}
    env.pop("RAY_AUTH_MODE")
    hr = tmp_path / "hr"
    hr.mkdir()
    for k in range(12):
        rng_image(96, 80, k).save(hr / f"{k:03d}.png")
    upload_folder(s3, hr, "data", "hr")
    upload_folder(s3, released_tiny, "weights", "tiny")
    s3.create_bucket(Bucket="runs")
    (tmp_path / "ts.yaml").write_text("min_pixels: 1\nmin_file_bytes: 0\n")  # small test images pass the filters
    built = ugcsr(["build-trainset", "s3://data/hr", "s3://data/trainset", "--crop", "64", "--shards", "2",
                   "--config", str(tmp_path / "ts.yaml")], env, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    train = ["train", "s3://data/trainset", "s3://runs/r1", "--preset", "tiny", "--weights", "s3://weights/tiny",
             "--workers", "2", "--max-steps", "2", "--checkpoint-every", "2"]
    done = ugcsr(["submit", "--address", address, "--wait", "--", *train], env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix="r1/")["Contents"]}
    assert {"r1/export/checkpoint-2/unet/config.json", "r1/export/checkpoint-2/controlnet/config.json",
            "r1/train/checkpoint-00000002/trainable.safetensors"} <= keys
    staged = [p for k in range(2) for p in (tmp_path / f"node-{k}-cache").rglob(".ugcsr-staged.json")]
    assert staged, "worker nodes staged the weights from S3 into their own caches"
    s3.create_bucket(Bucket="inputs")
    for k in range(2):
        buf = io.BytesIO()
        rng_image(20, 16, k).save(buf, "PNG")
        s3.put_object(Bucket="inputs", Key=f"src/{k}.png", Body=buf.getvalue())
    up = ugcsr(["submit", "--address", address, "--wait", "--", "upscale", "s3://inputs/src", "s3://runs/sr",
                "--preset", "tiny", "--weights", "s3://weights/tiny", "--seesr", "s3://runs/r1/export/checkpoint-2"],
               env, timeout=900)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    rows = read_manifest("s3://runs/sr", StorageConfig(endpoint_url=s3_endpoint)).to_pylist()
    assert sorted(r["status"] for r in rows) == ["ok", "ok"]
    assert {r["model_id"] for r in rows} == {"tiny:seesr:s3://runs/r1/export/checkpoint-2"}
