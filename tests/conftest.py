"""Shared fixtures: the tiny model, a local Ray, a real S3 server on loopback."""

import os
import socket

import pytest

import srmodel

# Dummy credentials for the local S3 server, set before any Ray worker starts so they inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
