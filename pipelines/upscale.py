"""`ugcsr upscale`: a streaming, resumable Ray Data pipeline.

read (CPU) -> decode (CPU) -> semantic (actor pool, fractional GPU) -> SR
(actor pool) -> encode + write (CPU) -> manifest parts written by the driver
as rows stream in. Resume: inputs with an `ok` row of the same params_hash
are dropped before the dataset is built.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from actors import io
from actors.fused import SemanticSRStage
from actors.semantic import SemanticStage
from actors.sr import SRStage
from cluster import ray_runtime
from cluster.lease import DstLease
from cluster.storage import is_remote, join, write_bytes_atomic
from cluster.weights import check_remote
from srmodel.loader import resolve

from .job import UpscaleJob
from .listing import list_inputs
from .manifest import STAGES, ManifestWriter, done_ids, rows_from_batch
from .paths import IMAGE_EXTENSIONS
from .pools import plan_pools

log = logging.getLogger("ugcsr")


@dataclass
class Plan:
    total: int
    todo: pa.Table
    skipped: int
    listing_cached: bool
    pools: dict = field(default_factory=dict)


def make_plan(job: UpscaleJob, *, save_listing: bool = True) -> Plan:
    """What to process; `pools` is filled in once connected (planned from the cluster's nodes)."""
    listing, cached = list_inputs(job.src, job.dst, job.storage, job.format, save=save_listing, relist=job.relist)
    if not len(listing):
        raise FileNotFoundError(f"SRC {job.src} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                                "nothing to do")
    done = done_ids(job.dst, job.storage, job.params_hash())
    todo = listing.filter(pc.invert(pc.is_in(listing["image_id"], value_set=done))) if len(done) else listing
    skipped = len(listing) - len(todo)
    if job.limit:  # at most N to process this run: re-running with the same limit moves on
        todo = todo.slice(0, job.limit)
    return Plan(total=len(todo) + skipped, todo=todo, skipped=skipped, listing_cached=cached)


def build_dataset(job: UpscaleJob, todo: pa.Table, pools: dict):
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    r = job.resources
    k = r.rows_per_block
    blocks = [todo.slice(i, k) for i in range(0, len(todo), k)]
    io_tasks = min(r.io_tasks, len(blocks))  # more tasks than blocks only earns Ray a warning
    model = job.model.model_dump(mode="json")
    storage = job.storage.model_dump(mode="json")
    ds = ray.data.from_arrow(blocks)
    # IO stages are cheap to construct: run them as tasks in Ray's pooled workers (Ray Data fuses
    # read+decode into one task) instead of starting more actor processes.
    ds = ds.map_batches(io.read_decode, fn_kwargs={"storage": storage, "max_pixels": job.max_pixels},
                        batch_size=r.io_batch, num_cpus=pools["io_cpus"], compute=TaskPoolStrategy(size=io_tasks))
    sr_kwargs = {"config": model, "base_seed": job.base_seed, "cpu_threads": pools.get("cpu_threads"),
                 "max_output_pixels": job.max_output_pixels, "storage": storage}
    # Min..max: a fixed cluster gets min == max (every actor up front); an autoscaling one grows GPU nodes.
    sr_pool = ActorPoolStrategy(min_size=pools["sr_actors"], max_size=pools["sr_actors_max"])
    if pools["layout"] == "fused":
        ds = ds.map_batches(SemanticSRStage, fn_constructor_kwargs={**sr_kwargs, "cache_uri": job.cache_semantic},
                            batch_size=r.sr_batch, compute=sr_pool, num_gpus=pools["sr_gpus"], num_cpus=pools["sr_cpus"])
    else:
        ds = ds.map_batches(SemanticStage, fn_constructor_kwargs={"config": model, "cpu_threads": pools.get("cpu_threads"),
                                                                   "cache_uri": job.cache_semantic, "storage": storage},
                            batch_size=r.semantic_batch, compute=ActorPoolStrategy(size=pools["semantic_actors"]),
                            num_gpus=pools["semantic_gpus"], num_cpus=pools["semantic_cpus"])
        ds = ds.map_batches(SRStage, fn_constructor_kwargs=sr_kwargs, batch_size=r.sr_batch, compute=sr_pool,
                            num_gpus=pools["sr_gpus"], num_cpus=pools["sr_cpus"])
    ds = ds.map_batches(io.write, fn_kwargs={"dst": job.dst, "fmt": job.format, "quality": job.quality, "storage": storage},
                        batch_size=r.io_batch, num_cpus=pools["io_cpus"], compute=TaskPoolStrategy(size=io_tasks))
    return ds


class Tally:
    """Running counts for the summary: the driver keeps no per-image state (corpora of millions)."""

    def __init__(self):
        self.status: Counter = Counter()
        self.errors: Counter = Counter()
        self.stage_ms = {s: [0.0, 0] for s in STAGES}

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            self.status[r["status"]] += 1
            if r["error_type"]:
                self.errors[r["error_type"]] += 1
            for s, v in r["timings_ms"].items():
                if v:
                    self.stage_ms[s][0] += v
                    self.stage_ms[s][1] += 1


def summarize(tally: Tally, plan: Plan, wall: float, job: UpscaleJob) -> dict:
    status = Counter(tally.status)
    if plan.skipped:
        status["skipped"] += plan.skipped
    processed = sum(tally.status.values())
    per_stage = {
        s: {"ms_per_image": round(total / n, 3), "images_per_s_per_worker": round(1000 * n / total, 3)}
        for s, (total, n) in tally.stage_ms.items() if n and total
    }
    return {
        "src": job.src,
        "dst": job.dst,
        "preset": job.model.name,
        "params_hash": job.params_hash(),
        "images": plan.total,
        "by_status": dict(status),
        "by_error_type": dict(tally.errors),
        "processed": processed,
        "wall_s": round(wall, 3),
        "images_per_s": round(processed / wall, 4) if wall > 0 else None,
        "stages": per_stage,
        "pools": plan.pools,
        "listing_reused": plan.listing_cached,
    }


def run_upscale(job: UpscaleJob, *, on_plan=None, on_rows=None, num_cpus: int | None = None) -> dict:
    """Run the job to the end; `on_plan(plan)` sees the plan, `on_rows(rows)` each batch of manifest rows."""
    check_source(job)  # missing weights fail here, not inside every actor
    with DstLease(job.dst, job.storage):  # one writer per DST: a second run fails naming this one
        return _run_leased(job, on_plan=on_plan, on_rows=on_rows, num_cpus=num_cpus)


def _run_leased(job: UpscaleJob, *, on_plan=None, on_rows=None, num_cpus: int | None = None) -> dict:
    started = time.perf_counter()
    plan = make_plan(job)  # bad SRC/DST fail here, before any cluster is started
    where = ray_runtime.connect(job.address, num_cpus=num_cpus)
    check_paths_reach_nodes(job)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own
    ctx.wait_for_min_actors_s = int(job.actor_start_timeout_s)  # never hang silently on unschedulable actors
    plan.pools = plan_pools(job, nodes=ray_runtime.alive_nodes(), autoscale=ray_runtime.autoscaling_node_types(),
                            todo=len(plan.todo))
    log.info("ugcsr: Ray at %s; %d image(s) to process, %d skipped; pools %s", where, len(plan.todo), plan.skipped,
             json.dumps(plan.pools))
    if on_plan:
        on_plan(plan)
    writer = ManifestWriter(job.dst, job.storage, max_delay_s=job.manifest_flush_s)
    tally = Tally()
    meta = dict(params_hash=job.params_hash(), model_id=_model_id(job), node_id=socket.gethostname())
    try:
        if len(plan.todo):
            ds = build_dataset(job, plan.todo, plan.pools)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                new = rows_from_batch(batch, **meta)
                writer.add(new)
                tally.add(new)
                if on_rows:
                    on_rows(new)
    finally:
        writer.flush()  # rows of images already written survive a failing or interrupted run
    summary = summarize(tally, plan, time.perf_counter() - started, job)
    write_bytes_atomic(join(job.dst, "_manifest", "summary.json"), json.dumps(summary, indent=2).encode(), job.storage)
    return summary


def check_source(job: UpscaleJob) -> None:
    # Actors resolve the model themselves (the tiny preset is built on each node), so `job` keeps it as given.
    src = resolve(job.model).source
    parts = [("stable-diffusion-2-base folder", src.sd_base), ("SeeSR checkpoint folder", src.seesr),
             ("SAM2 checkpoint", src.sam2_checkpoint)]
    if job.model.sampler.prompt_source == "tagger":
        if not src.ram:
            raise FileNotFoundError("prompt_source=tagger needs ram_swin_large_14m.pth (and DAPE.pth) in the model "
                                    "source; put them beside the other weights or use --prompt-source fixed")
        parts += [("RAM checkpoint", src.ram)] + ([("DAPE LoRA", src.dape)] if src.dape else [])
    for what, path in parts:
        if not is_remote(path) and not os.path.exists(path):
            raise FileNotFoundError(f"{what} {path} does not exist (model source of preset {job.model.name!r})")
    check_remote(src, job.storage)  # weights on object storage: listed here, staged by each node's actors


def check_paths_reach_nodes(job: UpscaleJob) -> None:
    """Local SRC/DST/cache/weights paths mean another disk on another machine: refuse unless --shared-fs."""
    if job.shared_fs or not ray_runtime.spans_machines():
        return
    src = job.model.source
    local = [(what, p) for what, p in (("SRC", job.src), ("DST", job.dst), ("--cache-semantic", job.cache_semantic),
                                      ("weights", src.sd_base if src else None)) if p and not is_remote(p)]
    if local:
        names = ", ".join(f"{what} {p}" for what, p in local)
        raise ValueError(f"{names}: a local path on a multi-node Ray cluster means a different disk on each node; "
                         "use object storage (s3://...) or, if it is a filesystem every node mounts at the same "
                         "path, pass --shared-fs")


def _model_id(job: UpscaleJob) -> str:
    src = job.model.source
    return f"{job.model.name}:{src.revision}" if src else f"{job.model.name}:random"


def dry_run(job: UpscaleJob) -> dict:
    """What would run: counts to process/skip and the pools asked for, without loading any model."""
    nodes, autoscale = None, []
    try:
        import ray

        if ray.is_initialized() or ray_runtime.target(job.address):
            ray_runtime.connect(job.address)
            nodes, autoscale = ray_runtime.alive_nodes(), ray_runtime.autoscaling_node_types()
    except Exception:  # noqa: BLE001 - a dry run never needs a cluster
        pass
    plan = make_plan(job, save_listing=False)  # a dry run writes nothing and loads no model
    try:
        plan.pools = plan_pools(job, nodes=nodes, autoscale=autoscale, todo=len(plan.todo))
    except ValueError as err:  # what the real run would refuse, said instead of a pool plan
        plan.pools = {"error": str(err)}
    return {
        "images": plan.total,
        "to_process": len(plan.todo),
        "to_skip": plan.skipped,
        "listing_reused": plan.listing_cached,
        "params_hash": job.params_hash(),
        "pools": plan.pools,
        "first": plan.todo.slice(0, 5).column("src_uri").to_pylist(),
    }
