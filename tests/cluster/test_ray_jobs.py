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
from pathlib import Path

import pytest

from cluster.storage import StorageConfig
from tests.support.cluster_helpers import upload_folder
from tests.support.ports import free_port
from tests.support.inputs import rng_image
from pipelines.upscale.manifest import read_manifest

pytestmark = pytest.mark.slow  # `ray start --head` and the Jobs API

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with its dashboard (Jobs API) on a free port; every port chosen free."""
    import psutil

    ports = {name: free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "metrics-export-port",
                                            "runtime-env-agent-port", "ray-client-server-port",
                                            "node-manager-port", "object-manager-port")}
    env = {**os.environ,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # a one-machine Ray: node address 127.0.0.1, not the NIC's
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),  # this head's own token
           "UGCSR_CACHE": str(tmp_path / "node-cache"),  # where the node stages the weights
           "PYTHONPATH": str(ROOT)}
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
        yield address, env
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
