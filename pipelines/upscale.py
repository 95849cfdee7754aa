"""`ugcsr upscale`: a streaming, resumable Ray Data pipeline.

read (CPU) -> decode (CPU) -> semantic (actor pool, fractional GPU) -> SR
(actor pool) -> encode + write (CPU) -> manifest parts written by the driver
as rows stream in. Resume: inputs with an `ok` row of the same params_hash
are dropped before the dataset is built.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from actors import io
from actors.semantic import SemanticStage
from actors.sr import SRStage
from cluster import ray_runtime
from cluster.storage import is_remote, join, write_bytes_atomic
from srmodel.loader import resolve

from .job import UpscaleJob
from .listing import list_inputs
from .manifest import STAGES, ManifestWriter, done_ids, rows_from_batch
from .paths import IMAGE_EXTENSIONS


@dataclass
class Plan:
    total: int
    todo: pa.Table
    skipped: int
    listing_cached: bool
    pools: dict = field(default_factory=dict)


def plan_pools(job: UpscaleJob, gpus: float) -> dict:
    r = job.resources
    if gpus > 0:
        # One SR actor per GPU (0.75 of it), the rest of each GPU left for semantic actors.
        sr = r.sr_actors or max(1, int(gpus // r.sr_gpus) if r.sr_gpus >= 1 else int(gpus))
        sem = r.semantic_actors or max(1, math.ceil(gpus / 4))
        asked = sr * r.sr_gpus + sem * r.semantic_gpus
        if asked > gpus + 1e-9:
            raise ValueError(
                f"the actor pools ask for {asked:g} GPUs ({sr} SR x {r.sr_gpus:g} + {sem} semantic x "
                f"{r.semantic_gpus:g}) but the cluster has {gpus:g}; lower resources.sr_actors/semantic_actors "
                "or their GPU shares"
            )
        return dict(sr_actors=sr, sr_gpus=r.sr_gpus, semantic_actors=sem, semantic_gpus=r.semantic_gpus,
                    sr_cpus=r.sr_cpus, semantic_cpus=r.semantic_cpus, io_cpus=r.io_cpus)
    # No GPUs: the same pipeline with CPU actors (tests, laptops); the SR actors share the cores' threads.
    sr = r.sr_actors or 1
    return dict(sr_actors=sr, sr_gpus=0, semantic_actors=r.semantic_actors or 1, semantic_gpus=0,
                sr_cpus=r.sr_cpus, semantic_cpus=r.semantic_cpus, io_cpus=r.io_cpus,
                cpu_threads=max(1, (os.cpu_count() or 1) // sr))


def make_plan(job: UpscaleJob, gpus: float = 0.0, *, save_listing: bool = True) -> Plan:
    listing, cached = list_inputs(job.src, job.dst, job.storage, job.format, save=save_listing, relist=job.relist)
    if not len(listing):
        raise FileNotFoundError(f"SRC {job.src} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                                "nothing to do")
    done = done_ids(job.dst, job.storage, job.params_hash())
    todo = listing.filter(pc.invert(pc.is_in(listing["image_id"], value_set=done))) if len(done) else listing
    skipped = len(listing) - len(todo)
    if job.limit:  # at most N to process this run: re-running with the same limit moves on
        todo = todo.slice(0, job.limit)
    return Plan(total=len(todo) + skipped, todo=todo, skipped=skipped, listing_cached=cached,
                pools=plan_pools(job, gpus))


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
    ds = ds.map_batches(SemanticStage, fn_constructor_kwargs={"config": model, "cpu_threads": pools.get("cpu_threads"),
                                                               "cache_uri": job.cache_semantic, "storage": storage},
                        batch_size=r.semantic_batch, compute=ActorPoolStrategy(size=pools["semantic_actors"]),
                        num_gpus=pools["semantic_gpus"], num_cpus=pools["semantic_cpus"])
    ds = ds.map_batches(SRStage, fn_constructor_kwargs={"config": model, "base_seed": job.base_seed,
                                                         "cpu_threads": pools.get("cpu_threads"),
                                                         "max_output_pixels": job.max_output_pixels},
                        batch_size=r.sr_batch, compute=ActorPoolStrategy(size=pools["sr_actors"]),
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
    started = time.perf_counter()
    check_source(job)  # missing weights fail here, not inside every actor
    plan = make_plan(job)  # bad SRC/DST fail here, before any cluster is started
    ray_runtime.connect(job.address, num_cpus=num_cpus)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own
    ctx.wait_for_min_actors_s = int(job.actor_start_timeout_s)  # never hang silently on unschedulable actors
    plan.pools = plan_pools(job, ray_runtime.cluster_gpus())
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


def _model_id(job: UpscaleJob) -> str:
    src = job.model.source
    return f"{job.model.name}:{src.revision}" if src else f"{job.model.name}:random"


def dry_run(job: UpscaleJob) -> dict:
    """What would run: counts to process/skip and the pools asked for, without loading any model."""
    gpus = 0.0
    try:
        import ray

        if ray.is_initialized() or job.address:
            ray_runtime.connect(job.address)
            gpus = ray_runtime.cluster_gpus()
    except Exception:  # noqa: BLE001 - a dry run never needs a cluster
        pass
    plan = make_plan(job, gpus, save_listing=False)  # a dry run writes nothing and loads no model
    return {
        "images": plan.total,
        "to_process": len(plan.todo),
        "to_skip": plan.skipped,
        "listing_reused": plan.listing_cached,
        "params_hash": job.params_hash(),
        "pools": plan.pools,
        "first": plan.todo.slice(0, 5).column("src_uri").to_pylist(),
    }
