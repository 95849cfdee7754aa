"""Shared fixtures: the tiny model, a local Ray, a real S3 server on loopback; and the `slow` rule.

Tiers: `python3 -m pytest -q -m "not slow"` is the edit-test loop (under 5 minutes on 2 cores);
`python3 -m pytest -q` runs everything, as CI does. A test that starts Ray, a server or a browser,
or runs longer than a few seconds, is `slow`. Tests that use the local Ray or the S3 server below
are marked here, so a new one cannot land in the fast tier by mistake; others carry the mark.
Tests marked `realsize` run only when asked for (see realsize_wanted).
"""

import os

import pytest

import srmodel
from tests.support.ports import free_port

# Dummy credentials for the local S3 server, set before any Ray worker starts so they inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)


# `realsize` tests write and load the real-size random release (~4.6 GB on disk, minutes): they run only when
# asked, by UGCSR_REALSIZE=1 or by naming the marker in `-m` (`-m realsize`, `-m "realsize and not slow"`);
# otherwise they are deselected, whatever else `-m` says. So `python3 -m pytest -q` (CI) and `-m "not slow"` leave
# them out.
REALSIZE_ENV = "UGCSR_REALSIZE"


def realsize_wanted(config) -> bool:
    expr = config.getoption("markexpr") or ""
    return os.environ.get(REALSIZE_ENV) == "1" or "realsize" in expr.replace("not realsize", "")


# Fixtures that start Ray or a server: every test that uses them (directly or through another fixture) is slow.
SLOW_FIXTURES = {"ray_local", "s3_endpoint"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if not realsize_wanted(config):
        dropped = [item for item in items if item.get_closest_marker("realsize")]
        if dropped:
            items[:] = [item for item in items if not item.get_closest_marker("realsize")]
            config.hook.pytest_deselected(items=dropped)


EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process once pytest has reported, skipping the interpreter's teardown.

    The suite loads torch, Ray, pyarrow, s3fs, moto and Playwright into one process; CI once ended with
    SIGSEGV (exit 139) after "598 passed", in teardown, where nothing is tested any more (native libraries'
    threads and static destructors racing interpreter finalisation; pyarrow's bundled allocator has known
    teardown crashes, apache/arrow#50428). The run's own exit status is kept. UGCSR_TEST_TEARDOWN=1 keeps
    the normal teardown, to chase such a crash with PYTHONFAULTHANDLER=1.
    """
    if EXIT_STATUS in config.stash and os.environ.get("UGCSR_TEST_TEARDOWN") != "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[EXIT_STATUS])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The `tiny` preset's folder, built once per test session (a ModelSource)."""
    return srmodel.ensure_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_cache(tiny_model):
    """UGCSR_CACHE pointing at the session's tiny model, for code (and Ray workers) that build it by name."""
    from pathlib import Path

    cache = str(Path(tiny_model.sd_base).parents[1])
    os.environ["UGCSR_CACHE"] = cache
    return cache


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (real HTTP, real s3fs/boto3 code paths)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """A boto3 client on the local server; buckets are wiped after the test."""
    import boto3
    import requests
    import s3fs

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    yield client
    requests.post(f"{s3_endpoint}/moto-api/reset", timeout=10)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def ray_local(tiny_cache):
    """A local Ray with logical CPUs to spare (stage actors take fractions of them)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)  # never a stray cluster
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def released_tiny(tmp_path_factory):
    """The tiny weights as `python -m srmodel.tiny DIR` writes them (the released folder layout)."""
    from srmodel.tiny import main

    folder = tmp_path_factory.mktemp("released") / "weights"
    assert main([str(folder)]) == 0
    return folder
