"""Connecting to Ray: an embedded local instance by default, or an existing cluster."""

from __future__ import annotations

import logging
import os

import ray


# ERROR: Ray's start-up warnings (e.g. the token-authentication notice) would land among the job's
# progress lines; Ray keeps its own logs in the session folder (the CLI's summary prints its path).
LOGGING_LEVEL = logging.ERROR


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start (no address) or join (address) Ray; a no-op when this process is already connected."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=LOGGING_LEVEL)
        return
    # Logical CPUs: GPU-less stage actors and IO tasks share cores; too few slots
    # makes Ray Data stall (see docs/pipeline.md), so never fewer than 4.
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
             logging_level=LOGGING_LEVEL)
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0))
