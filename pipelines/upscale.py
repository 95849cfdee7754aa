"""`ugcsr upscale`: a streaming, resumable Ray Data pipeline, planned as data.

plan (Ray tasks: listing shards, resume anti-join) -> read_parquet(todo shards)
-> read + decode (CPU tasks, concurrent fetches) -> semantic (actor pool) -> SR
(actor pool) -> encode + write (CPU tasks) -> manifest sink (CPU tasks write
Parquet parts under DST/_manifest/run=<id>/ and return one count row each).
The driver holds the plan's counts and iterates count rows: its memory does not
grow with the number of images.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
import warnings
from typing import Callable

from actors import io
from actors.guard import CrashJournal, guarded
from actors.semantic import SemanticStage
from actors.sr import SRStage
from cluster import ray_runtime
from cluster.storage import StorageConfig, filesystem, is_remote, join
from srmodel.loader import resolve

from . import listing as L
from .job import UpscaleJob
from .manifest import STAGES, done_tables, manifest_files, new_run_id, run_dir, write_part, write_summary

ProgressFn = Callable[[int, int, int], None]  # on_progress(done, errors, total): after each manifest part


@dataclass
class Plan:
    total: int  # listed images (after --limit: processed + skipped)
    to_process: int
    skipped: int
    listing_cached: bool
    todo_uris: list = field(default_factory=list)  # the todo shards (one per non-empty bucket)
    sample: list = field(default_factory=list)
    buckets: int = 0
    run_id: str = ""
    pools: dict = field(default_factory=dict)

    @property
    def todo(self) -> int:  # images this run will process (the progress total)
        return self.to_process


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


def _auto_buckets(job: UpscaleJob, known_rows: int | None) -> int:
    if job.plan_buckets:
        return job.plan_buckets
    if known_rows is not None:
        return max(1, min(4096, math.ceil(known_rows / L.ROWS_PER_BUCKET)))
    return 8


def make_plan(job: UpscaleJob, *, write: bool = True, run_id: str | None = None) -> Plan:
    """Listing and resume anti-join as Ray tasks (Ray must be connected); the driver keeps counts only.

    `write=False` (dry run) writes nothing: the plan's counts come back, no shard is stored.
    """
    import ray

    run_id = run_id or new_run_id()
    storage, cfg = job.storage, job.storage.model_dump(mode="json")
    retries = job.retries.task_max_retries
    tasks = job.plan_tasks or max(4, min(256, 2 * int(ray_runtime.cluster_cpus() or 1)))
    _, dst_path = filesystem(job.dst, storage)
    ctx = {"src": job.src, "dst_path": dst_path, "format": job.format, "storage": cfg, "cwd": os.getcwd()}
    folder = not L._is_list_file(job.src)
    meta = L.read_listing_meta(job.dst, storage) if folder else None
    cached = bool(folder and not job.relist and meta and meta.get("src") == job.src and meta.get("format") == job.format)
    if cached:
        buckets, listing_id, list_refs = meta["buckets"], meta["listing_id"], []
    else:
        units, known_rows = L.discover_units(job.src, job.dst, storage, max_units=tasks)
        buckets, listing_id = _auto_buckets(job, known_rows), L.new_listing_id()
        lister = L.bucket_task(L.list_units, buckets, max_retries=retries)
        list_refs = [lister(group, ctx, buckets) for group in L.group_units(units, tasks)]
    # The done set: ok rows of this params_hash in every manifest part, bucketed like the listing.
    files = manifest_files(job.dst, storage)
    per = max(1, math.ceil(len(files) / tasks))
    doner = L.bucket_task(done_tables, buckets, max_retries=retries)
    done_refs = [doner(files[i : i + per], dst=job.dst, storage=cfg, params_hash=job.params_hash(), buckets=buckets)
                 for i in range(0, len(files), per)]
    if write:
        _remove(join(job.dst, "_state", "todo"), storage)  # shards of an interrupted earlier run
    planner = ray.remote(max_retries=retries)(L.plan_bucket)
    refs = []
    for k in range(buckets):
        spec = {"storage": cfg,
                "listing_in": L.listing_part_uri(job.dst, listing_id, k) if cached else None,
                "listing_out": L.listing_part_uri(job.dst, listing_id, k) if (write and folder and not cached) else None,
                "todo_out": join(job.dst, "_state", "todo", run_id, f"part-{k:05d}.parquet") if write else None}
        mine = [r[k] for r in list_refs]
        refs.append(planner.remote(k, spec, len(mine), *mine, *[r[k] for r in done_refs]))
    listed = to_do = 0
    todo_uris, sample = [], []
    for out in ray.get(refs):  # B small dicts
        listed += out["listed"]
        to_do += out["todo"]
        if out["todo_uri"]:
            todo_uris.append(out["todo_uri"])
        sample += out["sample"][: max(0, 5 - len(sample))]
    if write and folder and not cached:
        L.commit_listing(job.dst, storage, {"src": job.src, "format": job.format, "buckets": buckets,
                                            "listing_id": listing_id, "images": listed}, meta)
    skipped = listed - to_do
    if job.limit:  # at most N to process this run: re-running with the same limit moves on
        to_do = min(to_do, job.limit)
    return Plan(total=to_do + skipped, to_process=to_do, skipped=skipped, listing_cached=cached,
                todo_uris=todo_uris, sample=sample, buckets=buckets, run_id=run_id)


def _remove(uri: str, storage: StorageConfig) -> None:
    fs, path = filesystem(uri, storage)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except (OSError, FileNotFoundError):
        pass  # leftovers cost space, never correctness


def io_sizes(job: UpscaleJob, pools: dict) -> tuple[int, int]:
    """(read/decode tasks, encode/write tasks): from the CPUs the actor pools leave free, unless set."""
    r = job.resources
    if r.io_tasks:
        return r.io_tasks, r.io_tasks
    cpus = ray_runtime.cluster_cpus() or float(os.cpu_count() or 1)
    free = max(1.0, cpus - pools["sr_actors"] * pools["sr_cpus"] - pools["semantic_actors"] * pools["semantic_cpus"])
    # Reads wait on the network (0.25 CPU each, threads inside); encoding is CPU-bound: half the free CPUs each.
    return max(2, int(free * 0.5 / r.io_cpus)), max(2, int(free * 0.5 / r.encode_cpus))


def build_dataset(job: UpscaleJob, plan: Plan, pools: dict, journal=None):
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for retry bounds; its catch-all **ray_remote_args warns (removal in 2.64).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return _build_dataset(job, plan, pools, journal)


def _build_dataset(job: UpscaleJob, plan: Plan, pools: dict, journal=None):
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    r, rt = job.resources, job.retries
    model = job.model.model_dump(mode="json")
    storage = job.storage.model_dump(mode="json")
    fs, _ = filesystem(plan.todo_uris[0], job.storage)
    fs.invalidate_cache()  # s3fs may have cached a listing of _state/ from before the shards were written
    paths = [filesystem(u, job.storage)[1] for u in plan.todo_uris]
    ds = ray.data.read_parquet(paths, filesystem=fs if is_remote(plan.todo_uris[0]) else None,
                               ray_remote_args={"max_retries": rt.task_max_retries})
    if job.limit:
        ds = ds.limit(plan.to_process)
    # A todo shard is one block of up to ~250k small rows: split it (streaming) so read tasks run in parallel.
    ds = ds.repartition(target_num_rows_per_block=r.io_batch)
    reads, writes = io_sizes(job, pools)
    guard = {"journal": journal, "max_crashes": rt.max_crashes_per_image}
    # Bounded (Ray Data's defaults are -1: a crashing input would be retried forever).
    task_retry = {"max_retries": rt.task_max_retries}
    actor_retry = {"max_restarts": rt.actor_max_restarts, "max_task_retries": rt.actor_max_task_retries}
    gpu = pools["sr_gpus"] > 0
    sr_mem = r.sr_memory_gb if r.sr_memory_gb is not None else (8.0 if gpu else 0.0)
    sem_mem = r.semantic_memory_gb if r.semantic_memory_gb is not None else (3.0 if gpu else 0.0)
    s = job.model.sampler
    group = {"scale": s.upscale, "process_size": s.process_size, "multiple": job.model.tiling.pad_multiple}
    ds = ds.map_batches(io.read_decode, fn_kwargs={"storage": storage, "max_pixels": job.max_pixels,
                                                   "fetch_threads": r.fetch_threads, "group": group, **guard},
                        batch_size=r.io_batch, num_cpus=pools["io_cpus"], compute=TaskPoolStrategy(size=reads),
                        **task_retry)
    ds = ds.map_batches(guarded(SemanticStage, "semantic"),
                        fn_constructor_kwargs={"config": model, "cpu_threads": pools.get("cpu_threads"),
                                               "cache_uri": job.cache_semantic, "storage": storage, **guard},
                        batch_size=r.semantic_batch, compute=ActorPoolStrategy(size=pools["semantic_actors"]),
                        num_gpus=pools["semantic_gpus"], num_cpus=pools["semantic_cpus"],
                        **({"memory": sem_mem * 2**30} if sem_mem else {}), **actor_retry)
    ds = ds.map_batches(guarded(SRStage, "sr"),
                        fn_constructor_kwargs={"config": model, "base_seed": job.base_seed,
                                               "cpu_threads": pools.get("cpu_threads"),
                                               "max_output_pixels": job.max_output_pixels, **guard},
                        batch_size=r.sr_batch, compute=ActorPoolStrategy(size=pools["sr_actors"]),
                        num_gpus=pools["sr_gpus"], num_cpus=pools["sr_cpus"],
                        **({"memory": sr_mem * 2**30} if sr_mem else {}), **actor_retry)
    ds = ds.map_batches(io.write, fn_kwargs={"dst": job.dst, "fmt": job.format, "quality": job.quality,
                                             "storage": storage, **guard},
                        batch_size=r.sr_batch, num_cpus=r.encode_cpus, compute=TaskPoolStrategy(size=writes),
                        **task_retry)
    meta = dict(dst=job.dst, run_id=plan.run_id, storage=storage, params_hash=job.params_hash(),
                model_id=_model_id(job), node_id=socket.gethostname())
    ds = ds.map_batches(write_part, fn_kwargs=meta, batch_size=job.manifest_rows_per_file, num_cpus=0.25,
                        compute=TaskPoolStrategy(size=2), **task_retry)
    return ds


class Tally:
    """Running counts from the sink's count rows: the driver keeps no per-image state."""

    def __init__(self):
        self.rows = self.ok = self.parts = 0
        self.errors: Counter = Counter()
        self.stage_ms = {s: [0.0, 0] for s in STAGES}

    def add(self, rec: dict) -> None:
        self.parts += 1
        self.rows += int(rec["rows"])
        self.ok += int(rec["ok"])
        self.errors.update(json.loads(str(rec["error_types"])))
        for s in STAGES:
            self.stage_ms[s][0] += float(rec[f"{s}_ms_sum"])
            self.stage_ms[s][1] += int(rec[f"{s}_n"])


def summarize(tally: Tally, plan: Plan, wall: float, job: UpscaleJob, state: str) -> dict:
    status = Counter({"ok": tally.ok, "error": tally.rows - tally.ok, "skipped": plan.skipped})
    per_stage = {
        s: {"ms_per_image": round(total / n, 3), "images_per_s_per_worker": round(1000 * n / total, 3)}
        for s, (total, n) in tally.stage_ms.items() if n and total
    }
    return {
        "run_id": plan.run_id,
        "state": state,
        "src": job.src,
        "dst": job.dst,
        "preset": job.model.name,
        "params_hash": job.params_hash(),
        "images": plan.total,
        "by_status": {k: v for k, v in status.items() if v},
        "by_error_type": dict(tally.errors),
        "processed": tally.rows,
        # Planned but without a row this run (blocks lost past every retry, or an interrupted run): redone on resume.
        "unaccounted": max(0, plan.to_process - tally.rows),
        "manifest": run_dir(job.dst, plan.run_id),
        "manifest_parts": tally.parts,
        "wall_s": round(wall, 3),
        "images_per_s": round(tally.rows / wall, 4) if wall > 0 else None,
        "stages": per_stage,
        "pools": plan.pools,
        "listing_reused": plan.listing_cached,
        "plan_buckets": plan.buckets,
    }


def run_upscale(job: UpscaleJob, *, on_plan=None, on_progress: ProgressFn | None = None, on_rows=None,
                num_cpus: int | None = None) -> dict:
    """Run the job to the end and return its summary (also written to DST/_runs/<run>/ and _runs/latest/).

    Hooks: `on_plan(plan)` once planned; `on_progress(done, errors, total)` after each manifest part
    (the progress display's hook); `on_rows(records)` with that part's count record.
    """
    import ray

    started = time.perf_counter()
    check_source(job)  # missing weights fail here, not inside every actor
    check_paths(job)  # so do a missing SRC and an unusable DST, before any cluster is started
    ray_runtime.connect(job.address, num_cpus=num_cpus)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own
    ctx.wait_for_min_actors_s = int(job.actor_start_timeout_s)  # never hang silently on unschedulable actors
    ctx.max_errored_blocks = job.retries.max_errored_blocks
    plan = make_plan(job)
    plan.pools = plan_pools(job, ray_runtime.cluster_gpus())
    if on_plan:
        on_plan(plan)
    tally, state = Tally(), "failed"
    journal = None
    try:
        if plan.to_process:
            journal = ray.remote(num_cpus=0, max_restarts=-1)(CrashJournal).remote()
            ds = build_dataset(job, plan, plan.pools, journal)
            batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
            try:
                for batch in batches:
                    for rec in batch.to_pylist():
                        tally.add(rec)
                        if on_rows:
                            on_rows([rec])
                    if on_progress:
                        on_progress(tally.rows, tally.rows - tally.ok, plan.to_process)
            finally:
                if hasattr(batches, "close"):
                    batches.close()  # an interrupted run stops its executor and releases its actors
        state = "finished"
    finally:
        # A summary even for a failed or interrupted run: what was written is in the manifest.
        summary = summarize(tally, plan, time.perf_counter() - started, job, state)
        write_summary(job.dst, plan.run_id, summary, job.storage)
        _remove(join(job.dst, "_state", "todo", plan.run_id), job.storage)
        if journal is not None:
            ray.kill(journal)
    return summary


def check_paths(job: UpscaleJob) -> None:
    fs, path = filesystem(job.src, job.storage)
    if not fs.exists(path):
        what = "list file" if L._is_list_file(job.src) else "folder/prefix"
        raise FileNotFoundError(f"SRC {job.src} does not exist (expected a {what} of images)")
    if not is_remote(job.dst) and os.path.exists(job.dst) and not os.path.isdir(job.dst):
        raise NotADirectoryError(f"DST {job.dst} is a file; give a folder or prefix for the outputs")


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
    """What would run: counts to process/skip and the pools asked for; loads no model, writes nothing.

    Planning runs as Ray tasks (an embedded local Ray when no address is given).
    """
    check_paths(job)
    ray_runtime.connect(job.address)
    plan = make_plan(job, write=False)
    return {
        "images": plan.total,
        "to_process": plan.to_process,
        "to_skip": plan.skipped,
        "listing_reused": plan.listing_cached,
        "params_hash": job.params_hash(),
        "plan_buckets": plan.buckets,
        "pools": plan_pools(job, ray_runtime.cluster_gpus()),
        "first": plan.sample,
    }
