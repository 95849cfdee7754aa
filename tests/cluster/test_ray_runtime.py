"""The embedded Ray start never joins a cluster recorded by an earlier, killed `ray start --head`."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # starts a Ray
def test_a_stale_cluster_record_does_not_break_the_embedded_start():
    # A short temp dir of our own: Ray's sockets live under it (path length limit) and the record is ours.
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    try:
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:1")  # what a head killed with SIGKILL leaves: an address nobody answers on
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
        code = "from cluster import ray_runtime; print(ray_runtime.connect(num_cpus=2)); import ray; ray.shutdown()"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == "local"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
