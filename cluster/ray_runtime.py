"""Connecting to Ray, and what the connected cluster looks like.

One rule (docs/cluster.md): an explicit address, else $RAY_ADDRESS (set by `ray job submit` and by
KubeRay for a job's entrypoint), else an embedded local Ray. Resources (num_cpus/num_gpus) are passed
only when this process starts the local instance: Ray refuses them when joining a cluster.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import ray

log = logging.getLogger("ugcsr")

# ERROR: Ray's start-up warnings (e.g. the token-authentication notice) would land among the job's
# progress lines; Ray keeps its own logs in the session folder (the CLI's summary prints its path).
LOGGING_LEVEL = logging.ERROR


def target(address: str | None = None) -> str | None:
    """The address `connect` will join, or None for an embedded local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> str:
    """Join `target(address)` or start a local Ray; a no-op when already connected. Returns where it went."""
    if ray.is_initialized():
        return "connected"
    where = target(address)
    if where and where.startswith(("http://", "https://")):
        raise ValueError(f"{where} is a dashboard (Ray Jobs API) address: run the command as a job with "
                         "`ugcsr submit`, or connect with --address ray://HEAD:10001 (client) or auto (on the head)")
    if where:
        # `auto` (on a cluster node), `HOST:PORT` (the GCS) and `ray://HOST:10001` (client mode) all go here.
        ray.init(address=where, log_to_driver=False, logging_level=LOGGING_LEVEL)
        return where
    # Logical CPUs: GPU-less stage actors and IO tasks share cores; too few slots
    # makes Ray Data stall (see docs/pipeline.md), so never fewer than 4.
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    # address="local": a new embedded Ray. A bare ray.init() would join whatever /tmp/ray/ray_current_cluster
    # names, a record a killed `ray start --head` leaves behind, and then refuse num_cpus.
    ray.init(address="local", num_cpus=cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
             logging_level=LOGGING_LEVEL)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return "local"


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0))


@dataclass(frozen=True)
class NodeShape:
    """What one node (or one autoscaling node type, `count` of them at most) offers to the actor pools."""

    cpus: float
    gpus: float
    count: int = 1
    address: str = ""
    autoscaled: bool = False


def alive_nodes(exclude: set[str] = frozenset()) -> list[NodeShape]:
    """The live nodes (but those whose ids are in `exclude`) with their total (not free) CPUs and GPUs: pools are
    planned per node, not per cluster."""
    out = []
    for n in ray.nodes():
        if n.get("Alive") and n.get("NodeID") not in exclude:
            res = n.get("Resources", {})
            out.append(NodeShape(cpus=float(res.get("CPU", 0)), gpus=float(res.get("GPU", 0)),
                                 address=n.get("NodeManagerAddress", "")))
    return out


def autoscaling_node_types() -> list[NodeShape]:
    """Node types the autoscaler may still add (KubeRay worker groups, launcher node types), if it says.

    Read from the cluster config the autoscaler publishes in the GCS; empty on a fixed cluster or when
    nothing was published. `count` is the group's max_count (-1: unbounded, taken as 1000).
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: no answer means "no autoscaler we can see"
        return []
    if config is None:
        return []
    shapes = []
    for group in config.node_group_configs:
        res = dict(group.resources)
        count = group.max_count if group.max_count >= 0 else 1000
        if count and (res.get("GPU", 0) or res.get("CPU", 0)):
            shapes.append(NodeShape(cpus=float(res.get("CPU", 0)), gpus=float(res.get("GPU", 0)), count=count,
                                    autoscaled=True))
    return shapes


def local_addresses() -> set[str]:
    """IP addresses of this machine, to tell whether every Ray node is this machine."""
    addrs = {"127.0.0.1", "localhost"}
    try:
        addrs.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    try:
        addrs.add(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - best effort
        pass
    return addrs


def spans_machines() -> bool:
    """True when some node of the cluster (now or after autoscaling) is another machine than this driver.

    In client mode (ray://) the driver runs off the cluster, so every node is another machine.
    """
    if ray.util.client.ray.is_connected():
        return True
    if autoscaling_node_types():
        return True
    here = local_addresses()
    return any(n.address not in here for n in alive_nodes())


def check_local_paths_reach_nodes(paths: list[tuple[str, str | None]], shared_fs: bool) -> None:
    """Local paths ((what, path) pairs) on a cluster of several machines mean another disk on each node:
    refused unless the caller says every node mounts them (--shared-fs). URIs (s3://...) always pass."""
    if shared_fs or not spans_machines():
        return
    local = [(what, p) for what, p in paths if p and ("://" not in p or p.startswith("file://"))]
    if local:
        names = ", ".join(f"{what} {p}" for what, p in local)
        raise ValueError(f"{names}: a local path on a multi-node Ray cluster means a different disk on each node; "
                         "use object storage (s3://...) or, if it is a filesystem every node mounts at the same "
                         "path, pass --shared-fs")
