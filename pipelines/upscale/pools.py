"""Actor pool plans that place on any node shape (docs/pipeline.md "Pools and placement").

Planned from the nodes (their CPUs and GPUs) and the node types an autoscaler may add, never from the
cluster total: a fractional request must fit inside one GPU of one node.

- `fused` (default): one actor per GPU runs the semantic stage and SR. All GPU actors are identical,
  so greedy placement in any order fills every node up to its capacity: the plan never asks for an
  actor that cannot start.
- `split`: a fixed semantic pool of S actors at share t and an SR pool at share s, with
  s + S*t <= 1 and s > G/(G+1) for G the most GPUs on one node. Then in any creation order no GPU
  holds two SR actors, a GPU without an SR actor has at least 1 - S*t >= s free, a semantic actor
  always finds t free, and a node whose GPUs all hold an SR actor shows less than s free in sum
  (Ray schedules across nodes by the sum of a node's GPU fractions), so it never draws one more.
"""

from __future__ import annotations

import math
import os

from cluster.ray_runtime import NodeShape

from .job import UpscaleJob

EPS = 1e-9


def gpu_slots(node: NodeShape, share: float) -> int:
    """How many actors asking for `share` GPU fit on the node's GPUs (each fractional one inside one GPU)."""
    if node.gpus <= 0:
        return 0
    if share <= 1:
        return math.floor(node.gpus + EPS) * math.floor(1 / share + EPS)
    return math.floor(node.gpus / share + EPS)


def node_capacity(node: NodeShape, share: float, cpus_each: float, reserved_cpus: float = 0.0) -> int:
    free = node.cpus - reserved_cpus
    cpu_slots = 10**9 if cpus_each <= 0 or math.isinf(free) else math.floor(max(0.0, free) / cpus_each + EPS)
    return max(0, min(gpu_slots(node, share), cpu_slots))


def _check_share(share: float, what: str) -> None:
    if share > 1 and abs(share - round(share)) > EPS:
        raise ValueError(f"resources.{what}={share:g}: Ray accepts a whole number of GPUs above 1 (or a fraction below)")


def _describe(nodes: list[NodeShape]) -> list[str]:
    return [f"{n.count} x {n.gpus:g} GPU / {n.cpus:g} CPU" + (" (autoscaling)" if n.autoscaled else "") for n in nodes]


def plan_pools(job: UpscaleJob, gpus: float | None = None, *, nodes: list[NodeShape] | None = None,
               autoscale: list[NodeShape] = (), todo: int | None = None) -> dict:
    """The pools for `job` on `nodes` (+ `autoscale` node types); `gpus` alone means one node of that many.

    Raises ValueError when the asked-for pools can never place, or when a preset that needs real weights
    would run on a cluster without any GPU (unless `allow_cpu`).
    """
    r = job.resources
    if nodes is None:
        nodes = [NodeShape(cpus=float("inf"), gpus=float(gpus or 0))]
    cpus_now = sum(n.cpus for n in nodes)
    # What the IO tasks may grow to once the autoscaler added every node type (CPU-only groups included).
    cpus_max = max(cpus_now, sum(t.cpus * t.count for t in autoscale))
    autoscale = [t for t in autoscale if t.gpus > 0]
    gpus_now = sum(n.gpus for n in nodes)
    gpus_max = max(gpus_now, sum(t.gpus * t.count for t in autoscale))
    base = dict(layout=r.layout, sr_cpus=r.sr_cpus, semantic_cpus=r.semantic_cpus, io_cpus=r.io_cpus,
                gpus_now=gpus_now, gpus_max=gpus_max, cpus_max=cpus_max if math.isfinite(cpus_max) else None,
                nodes=_describe(nodes + list(autoscale)))
    if gpus_max <= 0:
        if job.model.name != "tiny" and not job.allow_cpu:
            raise ValueError(
                f"preset {job.model.name!r} runs the full-size model and this cluster has no GPU (none now, and no "
                "autoscaling node type with GPUs); connect to a GPU cluster (--address), or pass --allow-cpu to run "
                "it on CPU anyway (very slow)")
        # No GPUs: the same pipeline with CPU actors (tests, laptops); the actors share the cores' threads.
        sr = r.sr_actors or 1
        sem = 0 if r.layout == "fused" else (r.semantic_actors or 1)
        return dict(base, sr_actors=sr, sr_actors_max=sr, sr_gpus=0, semantic_actors=sem, semantic_gpus=0,
                    cpu_threads=max(1, (os.cpu_count() or 1) // (sr + sem)))

    if r.layout == "fused":
        share, sem, sem_share = (r.sr_gpus or 1.0), 0, 0.0
        _check_share(share, "sr_gpus")
        reserved = 0.0
    else:
        # Ray's cluster scheduler and autoscaler see a remote node's GPUs as one sum (ray-project/ray#39987):
        # a node whose every GPU already holds an SR actor still shows G*(1-s) free and must not look as if
        # another SR actor fits there, or that actor waits on the wrong node forever. Hence G*(1-s) < s.
        biggest = max(n.gpus for n in [*nodes, *autoscale] if n.gpus > 0)
        sem = r.semantic_actors or max(1, math.ceil(gpus_max / 8))  # the semantic stage is ~1% of the work
        budget = 0.9 / (biggest + 1)  # S*t, with a margin below 1/(G+1)
        sem_share = r.semantic_gpus or math.floor(min(0.25, budget / sem) * 1e4) / 1e4  # Ray's 1e-4 fixed point
        share = r.sr_gpus or round(1 - sem * sem_share, 4)
        if not (share <= 1 and share + sem * sem_share <= 1 + EPS and biggest * (1 - share) < share - EPS):
            raise ValueError(
                f"split layout: sr_gpus={share:g} with {sem} semantic actors x {sem_share:g} GPU may not place in every "
                f"order on nodes of up to {biggest:g} GPUs; it needs sr_gpus + semantic_actors x semantic_gpus <= 1 "
                f"and sr_gpus > {biggest:g}/{biggest + 1:g} (or use layout: fused)")
        reserved = sem * r.semantic_cpus  # worst case: every semantic actor on the same node

    cap_now = sum(node_capacity(n, share, r.sr_cpus, reserved) for n in nodes)
    cap_max = max(cap_now, sum(node_capacity(t, share, r.sr_cpus, reserved) * t.count for t in autoscale))
    if r.layout == "split":  # N_SR <= GPUs keeps the semantic actors placeable (see the module doc)
        cap_now, cap_max = min(cap_now, math.floor(gpus_now + EPS)), min(cap_max, math.floor(gpus_max + EPS))
    # Read/decode/write tasks need CPU slots beside the actors, or Ray Data stalls (RAY_NOTES section 4).
    spare = sum(n.cpus for n in nodes) - cap_now * r.sr_cpus - reserved
    if spare < 2 * r.io_cpus and cap_now > 1:
        cap_now = max(1, cap_now - math.ceil((2 * r.io_cpus - spare) / r.sr_cpus))
    if r.sr_actors:
        if r.sr_actors > cap_max:
            raise ValueError(
                f"the actor pools ask for {r.sr_actors} SR actors at {share:g} GPU but the nodes can hold at most "
                f"{cap_max} ({'; '.join(_describe(nodes + list(autoscale)))}); lower resources.sr_actors")
        lo = hi = r.sr_actors
    elif autoscale and cap_max > cap_now:
        # Autoscaling: start with what is there (at least one, which makes the autoscaler add a GPU node),
        # grow up to what the node types allow, never beyond one actor per batch of work.
        lo = max(1, cap_now)
        hi = cap_max if todo is None else max(lo, min(cap_max, math.ceil(todo / r.sr_batch)))
    else:
        lo = hi = cap_now
    if r.sr_actors_max:
        lo, hi = min(lo, r.sr_actors_max), min(hi, r.sr_actors_max)
    if hi < 1:
        raise ValueError(
            f"no node can hold an SR actor ({share:g} GPU + {r.sr_cpus:g} CPU each): "
            f"{'; '.join(_describe(nodes + list(autoscale)))}; lower resources.sr_cpus or add CPUs to the GPU nodes")
    return dict(base, sr_actors=lo, sr_actors_max=hi, sr_gpus=share, semantic_actors=sem, semantic_gpus=sem_share)
