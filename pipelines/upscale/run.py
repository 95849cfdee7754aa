"""`ugcsr upscale`: a streaming, resumable Ray Data pipeline, planned as data.

plan (Ray tasks: listing shards, resume anti-join) -> read_parquet(todo shards)
-> read + decode (CPU tasks, concurrent fetches) -> semantic (actor pool) -> SR
(actor pool; or one fused semantic+SR pool) -> encode + write (CPU tasks) ->
the driver's manifest sink (Parquet parts under DST/_manifest/run=<id>/, written
when full or a minute old). The driver holds the plan's counts and at most one
part's rows: its memory does not grow with the number of images.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import socket
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

from actors import io
from actors.fused import SemanticSRStage
from actors.guard import CrashJournal, guarded
from actors.progress import ProgressCounter
from actors.semantic import SemanticStage
from actors.sr import SRStage
from cluster import ray_runtime
from cluster.lease import DstLease, LeaseLost, check_lease
from cluster.storage import StorageConfig, filesystem, is_local, is_remote, join
from cluster.source_policy import policy_for
from cluster.weights import check_uris
from srmodel.stages import resolve

from . import listing as L
from .job import SEMANTIC_MEMORY_GB, SR_MEMORY_GB, UpscaleJob
from .manifest import (STAGES, done_piece, manifest_files, new_run_id, rows_from_batch, run_dir, write_part,
                       write_summary)
from ..paths import IMAGE_EXTENSIONS
from .pieces import spans
from .pools import plan_pools
from .watchdog import ActorWatchdog

log = logging.getLogger("ugcsr")

ProgressFn = Callable[[int, int, int], None]  # on_progress(done, errors, total): as write batches finish


@dataclass
class Plan:
    total: int  # listed images (after --limit: processed + skipped)
    to_process: int
    skipped: int
    listing_cached: bool
    todo_uris: list = field(default_factory=list)  # the todo shards (one per non-empty bucket)
    todo_counts: list = field(default_factory=list)  # images in each todo shard
    sample: list = field(default_factory=list)
    buckets: int = 0
    run_id: str = ""
    listed_at: str | None = None  # when the listing was made (UTC, ISO 8601); None for a list file
    pools: dict = field(default_factory=dict)


def _auto_buckets(job: UpscaleJob, rows: int) -> int:
    """Buckets for `rows` listed images: a bucket stays ~ROWS_PER_BUCKET rows (a few tens of MiB in a task)."""
    return job.plan_buckets or max(1, min(L.MAX_BUCKETS, math.ceil(rows / L.ROWS_PER_BUCKET)))


def make_plan(job: UpscaleJob, *, write: bool = True, run_id: str | None = None) -> Plan:
    """Listing and resume anti-join as Ray tasks (Ray must be connected); the driver keeps counts only.

    Planning pieces go under DST/_state/plan/<run>/ and are removed once planned. `write=False` (dry run)
    keeps nothing else: the plan's counts come back, no listing or todo shard is stored.
    """
    import ray

    run_id = run_id or new_run_id()
    storage, cfg = job.storage, job.storage.model_dump(mode="json")
    tasks = job.plan_tasks or max(4, min(256, 2 * int(ray_runtime.cluster_cpus() or 1)))
    _, dst_path = filesystem(job.dst, storage)
    ctx = {"src": job.src, "dst_path": dst_path, "format": job.format, "storage": cfg, "cwd": os.getcwd()}
    folder = not L._is_list_file(job.src)
    meta = L.read_listing_meta(job.dst, storage) if folder else None
    # relist None: local folders are listed every run (cheap, new files never missed), remote prefixes once.
    relist = (not is_remote(job.src)) if job.relist is None else job.relist
    cached = bool(folder and not relist and meta and meta.get("src") == job.src and meta.get("format") == job.format
                  and meta.get("bucketing") == L.BUCKETING)
    listed_at = meta.get("listed_at") if cached else (dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                                                     if folder else None)
    plan_dir = join(job.dst, "_state", "plan", run_id)
    if write:
        # Shards of an interrupted earlier run (we hold the DST lease: no other run is writing here).
        _remove(join(job.dst, "_state", "todo"), storage)
        _remove_stale_plans(job.dst, storage)
    try:
        return _plan_pieces(job, run_id, plan_dir, ctx, tasks, folder, meta, cached, listed_at, write)
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None  # e.g. "SRC ... is not a folder": the user's problem, without Ray's wrapping
    finally:
        _remove(plan_dir, storage)


def _plan_pieces(job: UpscaleJob, run_id: str, plan_dir: str, ctx: dict, tasks: int, folder: bool,
                 meta: dict | None, cached: bool, listed_at: str | None, write: bool) -> Plan:
    import ray

    storage, cfg = job.storage, ctx["storage"]
    retries = job.retries.task_max_retries
    task = ray.remote(max_retries=retries)
    buckets = meta["buckets"] if cached else job.plan_buckets  # None: chosen from the count once listed
    list_refs, listing_id = [], None
    if not cached:
        units, known_rows = ray.get(task(L.discover_units).remote(job.src, job.dst, storage, max_units=tasks))
        if buckets is None and known_rows is not None:
            buckets = _auto_buckets(job, known_rows)
        listing_id = L.new_listing_id()
        for i, group in enumerate(L.group_units(units, tasks)):
            list_refs.append(task(L.list_pieces).remote(group, ctx, join(plan_dir, f"list-{i:05d}.arrow"), buckets))
    # The done set: ok rows of this params_hash in every manifest part, bucketed like the listing.
    files = manifest_files(job.dst, storage)
    per = max(1, math.ceil(len(files) / tasks))
    done_uris, done_refs = [], []
    for i in range(0, len(files), per):
        done_uris.append(join(plan_dir, f"done-{i // per:05d}.arrow"))
        done_refs.append(task(done_piece).remote(files[i : i + per], dst=job.dst, storage=cfg,
                                                 params_hash=job.params_hash(), uri=done_uris[-1], buckets=buckets))
    # An offset array (32 KiB) per piece on the driver: T tasks, plus one per PIECE_ROWS rows; the rows stay there.
    lists = [piece for pieces in ray.get(list_refs) for piece in pieces]
    dones = list(zip(done_uris, ray.get(done_refs)))
    if buckets is None:
        buckets = _auto_buckets(job, sum(p["rows"] for _, p in lists))
    planner = task(L.plan_bucket)
    refs = []
    for k in range(buckets):
        spec = {"storage": cfg,
                "listing_in": L.listing_part_uri(job.dst, meta["listing_id"], k) if cached else None,
                "listing_out": L.listing_part_uri(job.dst, listing_id, k) if (write and folder and not cached) else None,
                "todo_out": join(job.dst, "_state", "todo", run_id, f"part-{k:05d}.parquet") if write else None}
        refs.append(planner.remote(k, buckets, spec, spans(lists, k, buckets), spans(dones, k, buckets)))
    listed = to_do = 0
    todo_uris, todo_counts, sample = [], [], []
    for out in ray.get(refs):  # B small dicts
        listed += out["listed"]
        to_do += out["todo"]
        if out["todo_uri"]:
            todo_uris.append(out["todo_uri"])
            todo_counts.append(out["todo"])
        sample += out["sample"][: max(0, 5 - len(sample))]
    if not listed:
        raise FileNotFoundError(f"SRC {job.src} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                                "nothing to do")
    if write and folder and not cached:
        L.commit_listing(job.dst, storage, {"src": job.src, "format": job.format, "buckets": buckets,
                                            "bucketing": L.BUCKETING, "listing_id": listing_id, "images": listed,
                                            "listed_at": listed_at}, meta)
    skipped = listed - to_do
    if job.limit:  # at most N to process this run: re-running with the same limit moves on
        to_do = min(to_do, job.limit)
    return Plan(total=to_do + skipped, to_process=to_do, skipped=skipped, listing_cached=cached,
                todo_uris=todo_uris, todo_counts=todo_counts, sample=sample, buckets=buckets, run_id=run_id,
                listed_at=listed_at)


def executions(plan: Plan, per_execution: int) -> list[Plan]:
    """The plan cut into groups of whole todo shards of at most `per_execution` images (at least one shard
    each), each group's `to_process` capped so that all of them together do `plan.to_process` (--limit)."""
    groups: list[tuple[list, list]] = []
    for uri, n in zip(plan.todo_uris, plan.todo_counts):
        if not groups or (groups[-1][1] and sum(groups[-1][1]) + n > per_execution):
            groups.append(([], []))
        groups[-1][0].append(uri)
        groups[-1][1].append(n)
    out, left = [], plan.to_process
    for uris, counts in groups:
        if left <= 0:
            break
        out.append(replace(plan, todo_uris=uris, todo_counts=counts, to_process=min(sum(counts), left)))
        left -= out[-1].to_process
    return out


def _remove(uri: str, storage: StorageConfig) -> None:
    fs, path = filesystem(uri, storage)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except (OSError, FileNotFoundError):
        pass  # leftovers cost space, never correctness


def _remove_stale_plans(dst: str, storage: StorageConfig, age_s: float = 86400) -> None:
    """Pieces a driver killed while planning left behind, once a day old (a dry run may be planning now)."""
    fs, path = filesystem(join(dst, "_state", "plan"), storage)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except (OSError, FileNotFoundError):
        return
    finally:
        fs.invalidate_cache()  # s3fs keeps the listing: a later exists() of this run's folder would trust it
    for name in names:
        try:
            started = dt.datetime.strptime(name[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
        except ValueError:
            continue  # not a run id: not ours to delete
        if (dt.datetime.now(dt.timezone.utc) - started).total_seconds() > age_s:
            _remove(join(dst, "_state", "plan", name), storage)


def _prune_empty(root: str) -> None:
    """Remove `root` if it holds nothing but empty folders."""
    for folder, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        try:
            os.rmdir(folder)
        except OSError:
            return  # something is in there: keep it


MAX_IO_TASKS = 1024  # per stage: an autoscaling group without a max (count 1000) must not mean 10^5 tasks


def io_sizes(job: UpscaleJob, pools: dict, todo: int | None = None) -> tuple[int, int]:
    """(read/decode tasks, encode/write tasks): from the CPUs the actor pools leave free, unless set.

    The CPUs are those of the cluster at its largest (`pools["cpus_max"]`: autoscaling node types at their
    max count), not at start: a cluster that scales from zero would otherwise keep the head's caps for the
    whole run, and Ray Data's autoscaling requests stay within those caps. Ray Data launches only what the
    nodes up now can hold. With `todo` known, never more tasks than batches of work.
    """
    r = job.resources
    if r.io_tasks:
        reads = writes = r.io_tasks
    else:
        cpus = max(pools.get("cpus_max") or 0.0, ray_runtime.cluster_cpus() or float(os.cpu_count() or 1))
        sr = pools.get("sr_actors_max", pools["sr_actors"])
        free = max(1.0, cpus - sr * pools["sr_cpus"] - pools["semantic_actors"] * pools["semantic_cpus"])
        # Reads wait on the network (0.25 CPU each, threads inside); encoding is CPU-bound: half the free CPUs each.
        reads = min(MAX_IO_TASKS, max(2, int(free * 0.5 / r.io_cpus)))
        writes = min(MAX_IO_TASKS, max(2, int(free * 0.5 / r.encode_cpus)))
    if todo:
        reads, writes = min(reads, math.ceil(todo / r.io_batch)), min(writes, math.ceil(todo / r.sr_batch))
    return reads, writes


def build_dataset(job: UpscaleJob, plan: Plan, pools: dict, journal=None, progress=None, fence: dict | None = None):
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for retry bounds; its catch-all **ray_remote_args warns (removal in 2.64).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
        return _build_dataset(job, plan, pools, journal, progress, fence)


def _build_dataset(job: UpscaleJob, plan: Plan, pools: dict, journal=None, progress=None, fence: dict | None = None):
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    r, rt = job.resources, job.retries
    model = job.model.model_dump(mode="json")
    storage = job.storage.model_dump(mode="json")
    guard = {"journal": journal, "max_crashes": rt.max_crashes_per_image}
    # Bounded (Ray Data's defaults are -1: a crashing input would be retried forever).
    task_retry = {"max_retries": rt.task_max_retries}
    # Host memory is reserved for the full-size models on GPUs; the tiny preset (tests, trials on logical GPUs) needs none.
    full = pools["sr_gpus"] > 0 and job.model.name != "tiny"
    reads, writes = io_sizes(job, pools, plan.to_process)
    # One row per todo shard; each task streams its shard's rows out in blocks of io_batch (a shard holds up
    # to ~250k small rows), so the read tasks downstream run in parallel.
    ds = ray.data.from_items([{"uri": u} for u in plan.todo_uris], override_num_blocks=len(plan.todo_uris))
    ds = ds.map_batches(L.read_todo, fn_kwargs={"storage": storage, "rows_per_block": r.io_batch}, batch_size=1,
                        num_cpus=0.25, compute=TaskPoolStrategy(size=max(1, min(reads, len(plan.todo_uris)))),
                        **task_retry)
    if job.limit:
        ds = ds.limit(plan.to_process)
    actor_retry = {"max_restarts": rt.actor_max_restarts, "max_task_retries": rt.actor_max_task_retries}
    sr_mem = r.sr_memory_gb if r.sr_memory_gb is not None else (SR_MEMORY_GB if full else 0.0)
    sem_mem = r.semantic_memory_gb if r.semantic_memory_gb is not None else (SEMANTIC_MEMORY_GB if full else 0.0)
    s = job.model.sampler
    group = {"scale": s.upscale, "process_size": s.process_size, "multiple": job.model.tiling.pad_multiple}
    policy = policy_for(job.src, job.allow_src, IMAGE_EXTENSIONS).model_dump(mode="json")
    read_mem = r.read_memory_gb if r.read_memory_gb is not None else (
        (2 * 3 * r.read_batch_pixels + r.fetch_threads * 2**25) / 2**30 if full else 0.0)
    ds = ds.map_batches(io.read_decode, fn_kwargs={"storage": storage, "max_pixels": job.max_pixels,
                                                   "fetch_threads": r.fetch_threads, "group": group,
                                                   "policy": policy, "max_bytes": job.max_input_bytes,
                                                   "max_batch_pixels": r.read_batch_pixels, **guard},
                        batch_size=r.io_batch, num_cpus=pools["io_cpus"], compute=TaskPoolStrategy(size=reads),
                        **({"memory": read_mem * 2**30} if read_mem else {}), **task_retry)
    # Ray Data hands an actor whole blocks: without this an SR call took a whole read block (io_batch rows),
    # two in flight per actor (hour-long tails at x4, coarse retries). Blocks of a model batch instead.
    ds = ds.repartition(target_num_rows_per_block=min(r.sr_batch, r.semantic_batch))
    # New GPU actors (replacements, later executions) avoid nodes with a quarantined GPU (actors/device_health.py).
    gpu_args = {"ray_remote_args_fn": _avoiding_quarantined(journal)} if journal is not None else {}
    sr_kwargs = {"config": model, "base_seed": job.base_seed, "cpu_threads": pools.get("cpu_threads"),
                 "max_output_pixels": job.max_output_pixels, "storage": storage,
                 "gpu_share": pools["sr_gpus"] or 1.0, "time_budget_s": job.time_budget_s,
                 "call_output_pixels": r.sr_call_pixels, **guard}
    # Min..max: a fixed cluster gets min == max (every actor up front); an autoscaling one grows GPU nodes.
    sr_pool = ActorPoolStrategy(min_size=pools["sr_actors"], max_size=pools["sr_actors_max"])
    if pools["layout"] == "fused":  # one actor holds both models: its memory is both reservations
        mem = sr_mem + sem_mem
        ds = ds.map_batches(guarded(SemanticSRStage, "sr"),
                            fn_constructor_kwargs={**sr_kwargs, "cache_uri": job.cache_semantic},
                            batch_size=r.sr_batch, compute=sr_pool, num_gpus=pools["sr_gpus"], num_cpus=pools["sr_cpus"],
                            **({"memory": mem * 2**30} if mem else {}), **actor_retry, **gpu_args)
    else:
        ds = ds.map_batches(guarded(SemanticStage, "semantic"),
                            fn_constructor_kwargs={"config": model, "cpu_threads": pools.get("cpu_threads"),
                                                   "cache_uri": job.cache_semantic, "storage": storage, **guard},
                            batch_size=r.semantic_batch, compute=ActorPoolStrategy(size=pools["semantic_actors"]),
                            num_gpus=pools["semantic_gpus"], num_cpus=pools["semantic_cpus"],
                            **({"memory": sem_mem * 2**30} if sem_mem else {}), **actor_retry, **gpu_args)
        ds = ds.map_batches(guarded(SRStage, "sr"), fn_constructor_kwargs=sr_kwargs,
                            batch_size=r.sr_batch, compute=sr_pool, num_gpus=pools["sr_gpus"], num_cpus=pools["sr_cpus"],
                            **({"memory": sr_mem * 2**30} if sr_mem else {}), **actor_retry, **gpu_args)
    ds = ds.map_batches(io.write, fn_kwargs={"dst": job.dst, "fmt": job.format, "quality": job.quality,
                                             "storage": storage, "progress": progress, "fence": fence, **guard},
                        # One SR output block per call (at most sr_batch rows and sr_call_pixels of outputs).
                        batch_size=None, num_cpus=r.encode_cpus, compute=TaskPoolStrategy(size=writes),
                        **({"memory": r.write_memory_gb * 2**30} if r.write_memory_gb else {}), **task_retry)
    return ds


def _pools_without_quarantined(job: UpscaleJob, plan: Plan, journal, autoscale) -> dict:
    """The next execution's pools, planned again without the nodes of GPUs quarantined so far (new actors avoid
    them, so a pool sized for them would never start); at most the actors asked for."""
    import ray

    from .watchdog import NoGpuLeft

    excluded = set(ray.get(journal.excluded_nodes.remote(), timeout=30))
    if not excluded:
        return plan.pools
    nodes = ray_runtime.alive_nodes(exclude=excluded)
    if plan.pools["sr_gpus"] and not any(n.gpus for n in [*nodes, *autoscale]):
        raise NoGpuLeft(f"every GPU node has a GPU quarantined after device errors "
                        f"({ray.get(journal.quarantined.remote(), timeout=30)}); fix or replace them and run again "
                        "to resume")
    try:
        return plan_pools(job, nodes=nodes, autoscale=autoscale, todo=plan.to_process)
    except ValueError:  # fewer GPUs than resources.sr_actors asks for: as many as there are
        fewer = job.model_copy(update={"resources": job.resources.model_copy(update={"sr_actors": None})})
        return plan_pools(fewer, nodes=nodes, autoscale=autoscale, todo=plan.to_process)


def _avoiding_quarantined(journal):
    """Ray Data calls this before creating each actor: a label selector keeping it off quarantined GPUs' nodes
    (Ray places by node, not by GPU id)."""

    nodes: list[str] = []

    def remote_args() -> dict:
        import ray

        try:  # called inside Ray Data's scheduling loop: short, and never an error (the last answer stands)
            nodes[:] = ray.get(journal.excluded_nodes.remote(), timeout=5)
        except Exception as err:  # noqa: BLE001
            log.warning("ugcsr: the crash journal did not say which nodes to avoid (%r); using its last answer", err)
        return {"label_selector": {"ray.io/node-id": f"!in({','.join(nodes)})"}} if nodes else {}

    return remote_args


class ManifestSink:
    """The manifest's writer, on the driver: rows of written images come back from the write stage (a few
    strings and numbers each) and leave as a Parquet part once `rows` are in (a part may hold up to one write
    batch more) or the oldest waited `max_age_s`, whichever first. A killed driver loses at most that much; a
    bounded buffer is all the driver holds.

    A timer thread flushes an old buffer while the stream waits (a slow SR batch); `close` writes the rest.
    Each part's count row goes to `tally`. A failed write keeps its rows for the next try (the timer's, or the
    next batch's); the run ends only after FAILED_WRITES writes in a row failed (their images are redone on
    resume), or at once when the lease is lost.
    """

    FAILED_WRITES = 3

    def __init__(self, job: UpscaleJob, run_id: str, tally: Tally, fence: dict | None):
        self.meta = dict(dst=job.dst, run_id=run_id, storage=job.storage.model_dump(mode="json"), fence=fence)
        self.row_meta = dict(params_hash=job.params_hash(), model_id=_model_id(job), node_id=socket.gethostname())
        self.rows, self.max_age_s, self.tally = job.manifest_rows_per_file, job.manifest_max_age_s, tally
        self.pending: list[dict] = []
        self.received = 0  # rows the write stage handed on, in all
        self.since = 0.0
        self.failures, self.error = 0, None
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._timer = threading.Thread(target=self._tick, name="ugcsr-manifest", daemon=True)
        self._timer.start()

    def add(self, table) -> None:
        """One block of the write stage's output (a pyarrow table)."""
        rows = rows_from_batch(table.to_pydict(), **self.row_meta)
        self.received += len(rows)
        with self._lock:
            if not self.pending:
                self.since = time.monotonic()
            self.pending += rows
            if len(self.pending) >= self.rows:
                self._try_flush()
        self.raise_error()

    def _tick(self) -> None:
        while not self._stop.wait(min(5.0, self.max_age_s / 4)):
            with self._lock:
                if self.pending and time.monotonic() - self.since >= self.max_age_s:
                    self._try_flush()

    def _try_flush(self) -> None:
        """_flush; a failure is kept (raised by raise_error once it is final), the rows stay pending."""
        try:
            self._flush()
        except LeaseLost as err:
            self.error = err  # final: nothing more may be written
        except Exception as err:  # noqa: BLE001 - retried by the next flush
            self.failures += 1
            log.warning("ugcsr: writing a manifest part failed (%d in a row): %r", self.failures, err)
            if self.failures >= self.FAILED_WRITES:
                self.error = err

    def _flush(self) -> None:
        if self.pending:
            self.tally.add(write_part(self.pending, **self.meta))
            self.pending, self.failures = [], 0

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self, flush: bool = True) -> None:
        """Stop the timer; write what is buffered unless `flush` is False (a run that lost its lease)."""
        self._stop.set()
        self._timer.join(timeout=30)
        with self._lock:
            try:
                if flush and self.error is None:
                    self._flush()
            finally:
                self.pending = []
        if flush:
            self.raise_error()


class Tally:
    """Running counts from the manifest parts' count rows: the driver keeps no per-image state."""

    def __init__(self):
        self.rows = self.ok = self.parts = self.executions = 0
        self.gpus_quarantined: list[dict] = []
        self.errors: Counter = Counter()
        self.stage_ms = {s: [0.0, 0] for s in STAGES}

    def add(self, rec: dict) -> None:
        """A part's count row (write_part)."""
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
        "executions": tally.executions,
        # GPUs taken out of the run after device errors (actors/device_health.py).
        "gpus_quarantined": tally.gpus_quarantined,
        "wall_s": round(wall, 3),
        "images_per_s": round(tally.rows / wall, 4) if wall > 0 else None,
        "stages": per_stage,
        "pools": plan.pools,
        "listing_reused": plan.listing_cached,
        "plan_buckets": plan.buckets,
    }


def run_upscale(job: UpscaleJob, *, on_plan=None, on_progress: ProgressFn | None = None,
                num_cpus: int | None = None) -> dict:
    """Run the job to the end and return its summary (also written to DST/_runs/<run>/ and _runs/latest/).

    Hooks: `on_plan(plan)` once planned (counts and pools); `on_progress(done, errors, total)` as write
    batches finish (from a driver thread), with running totals of this run, and once more at the end with
    the exact figures from the manifest (the progress display's hook).
    """
    check_source(job)  # missing weights fail here, not inside every actor
    check_paths(job)  # so do a missing SRC and an unusable DST, before any cluster is started
    with DstLease(job.dst, job.storage) as lease:  # one writer per DST: a second run fails naming this one
        return _run_leased(job, lease, on_plan=on_plan, on_progress=on_progress, num_cpus=num_cpus)


def _run_leased(job: UpscaleJob, lease: DstLease, *, on_plan=None, on_progress: ProgressFn | None = None,
                num_cpus: int | None = None) -> dict:
    import ray

    started = time.perf_counter()
    where = ray_runtime.connect(job.address, num_cpus=num_cpus)
    check_paths_reach_nodes(job)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own
    ctx.max_errored_blocks = job.retries.max_errored_blocks
    plan = make_plan(job)
    autoscale = ray_runtime.autoscaling_node_types()
    plan.pools = plan_pools(job, nodes=ray_runtime.alive_nodes(), autoscale=autoscale, todo=plan.to_process)
    cold = any(t.gpus > 0 for t in autoscale)
    # Never hang silently on unschedulable actors; a GPU node the autoscaler adds needs longer to start.
    ctx.wait_for_min_actors_s = int(job.actor_start_timeout_s or (1800 if cold else 900))
    ctx.execution_no_progress_timeout_s = no_progress_timeout_s(job, ctx.wait_for_min_actors_s)
    log.info("ugcsr: Ray at %s; %d image(s) to process, %d skipped; pools %s", where, plan.to_process, plan.skipped,
             json.dumps(plan.pools))
    if on_plan:
        on_plan(plan)
    tally, state = Tally(), "failed"
    helpers, poller, watchdog = [], None, None
    try:
        if plan.to_process:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # On the driver's node: a worker node that leaves mid-run must not take them with it.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            journal = ray.remote(num_cpus=0, max_restarts=-1)(CrashJournal).options(scheduling_strategy=here).remote(
                max_device_faults=job.retries.max_device_faults)
            counter = ray.remote(num_cpus=0)(ProgressCounter).options(scheduling_strategy=here).remote()
            helpers = [journal, counter]
            if on_progress:
                poller = _ProgressPoller(counter, tally, plan.to_process, on_progress)
            watchdog = ActorWatchdog(journal, ctx.wait_for_min_actors_s)
            # Bounded executions: Ray Data keeps per-block records on the driver until an execution ends.
            # Each group starts its own actor pools (one model load per actor per group of ~10^6 images).
            groups = executions(plan, job.execution_images)
            for k, part in enumerate(groups):
                if len(groups) > 1:
                    log.info("ugcsr: execution %d/%d: %d image(s) in %d todo shard(s)", k + 1, len(groups),
                             part.to_process, len(part.todo_uris))
                while True:
                    before = set(ray.get(journal.excluded_nodes.remote(), timeout=30))
                    pools = _pools_without_quarantined(job, plan, journal, autoscale)
                    sink = ManifestSink(job, plan.run_id, tally, lease.fence)
                    watchdog.new_execution()
                    try:
                        _execute(build_dataset(job, part, pools, journal, counter, lease.fence), sink, poller, lease,
                                 watchdog)
                    except Exception:
                        # A GPU quarantined as the pool started (a broken GPU fails the self-test or model load of
                        # a new actor, and Ray Data fails the start): plan again without its node, start over.
                        if sink.received or not set(ray.get(journal.excluded_nodes.remote(), timeout=30)) - before:
                            raise
                        log.warning("ugcsr: a GPU was quarantined as the actors started: starting this execution "
                                    "again without its node")
                        continue
                    break
                tally.executions += 1
        state = "finished"
    finally:
        if poller is not None:
            poller.stop()
        if watchdog is not None:
            watchdog.stop()
            tally.gpus_quarantined = _quietly(lambda: ray.get(helpers[0].quarantined.remote(), timeout=30), [])
        if on_progress and plan.to_process and state == "finished":  # the exact figures, from the manifest parts
            on_progress(tally.rows, tally.rows - tally.ok, plan.to_process)
        # A summary even for a failed or interrupted run: what was written is in the manifest.
        summary = summarize(tally, plan, time.perf_counter() - started, job, state)
        if not lease.lost:  # a run that lost the lease writes nothing more into DST
            write_summary(job.dst, plan.run_id, summary, job.storage)
            _remove(join(job.dst, "_state", "todo", plan.run_id), job.storage)
        for actor in helpers:
            ray.kill(actor)
    return summary


def no_progress_timeout_s(job: UpscaleJob, start_s: float) -> float:
    """Ray Data's no-progress abort (default 30 min) for this job: actors starting, then two SR batches at the
    time budget per image (one actor, its two batches in flight). A healthy run with few GPUs never hits it;
    a hung one still ends. -1 (off) when the SR time is unbounded."""
    if job.time_budget_s is None:
        return -1
    return start_s + 2 * job.resources.sr_batch * job.time_budget_s


def _quietly(fn, default):
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - a summary detail, never the run's error
        log.warning("ugcsr: %r", err)
        return default


def _execute(ds, sink: ManifestSink, poller, lease: DstLease, watchdog: ActorWatchdog | None = None) -> None:
    """Stream one execution to its end, the write stage's rows into the manifest sink.

    A lost lease ends it (LeaseLost): every writer task checks before it writes, the driver between batches
    and once the execution ends (Ray Data passes over up to `max_errored_blocks` failed blocks silently).
    Whatever ends the execution, the rows already written to DST are flushed into the manifest first
    (unless the lease is lost: then nothing more is written).
    """
    lost = LeaseLost(f"DST {lease.dst}: this run lost its DST lease ({lease.uri}); it stopped writing. "
                     "Run again to resume once the other run ended")
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    waiting = watchdog.waiting if watchdog is not None else contextlib.nullcontext
    try:
        while True:
            with waiting():  # the watchdog may interrupt only here
                batch = next(batches, None)
            if batch is None:
                break
            sink.add(batch)
            if poller:
                poller.raise_error()
            lease.check()
        if poller:
            poller.raise_error()
        if _lost(lease):
            raise lost
    except LeaseLost:
        lease.lost = True  # found by a writer (or the sink) before the renewal thread: no summary either
        sink.close(flush=False)
        raise
    except BaseException as err:
        if _lost(lease):  # a writer refused to write: say why, without Ray's wrapping
            sink.close(flush=False)
            raise lost from err
        try:
            sink.close()  # the rows of images already written, even when the run fails or is interrupted
        except Exception:  # noqa: BLE001 - the run's own error is the one to report
            log.exception("ugcsr: could not write the last manifest part (its images are redone on resume)")
        if isinstance(err, KeyboardInterrupt) and watchdog is not None and watchdog.error is not None:
            raise watchdog.error from None  # the watchdog's interrupt: no GPU actor left
        raise
    else:
        sink.close()
    finally:
        if hasattr(batches, "close"):
            batches.close()  # an interrupted run stops its executor and releases its actors


def _lost(lease: DstLease) -> bool:
    try:
        lease.check()
        check_lease(lease.dst, lease.storage, **lease.fence)
    except LeaseLost:
        lease.lost = True
        return True
    except Exception:  # noqa: BLE001 - the store cannot say: the run's own error stands
        return False
    return False


class _ProgressPoller:
    """A driver thread: calls on_progress whenever the write stage's count moves (see actors/progress.py)."""

    def __init__(self, counter, tally: Tally, total: int, on_progress: ProgressFn):
        self.counter, self.tally, self.total, self.on_progress = counter, tally, total, on_progress
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ugcsr-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import ray

        seen = (0, 0)
        while not self._stop.is_set():
            try:
                now = tuple(ray.get(self.counter.wait.remote(seen, 1.0), timeout=10))
            except Exception:  # noqa: BLE001 - a display hint: never let it disturb the run
                self._stop.wait(1.0)
                continue
            if self._stop.is_set():
                break
            if now == seen:  # the wait timed out: nothing new to show
                continue
            seen = now
            done = min(self.total, max(seen[0], self.tally.rows))  # a retried write batch may count twice
            try:
                self.on_progress(done, min(done, seen[1]), self.total)
            except BaseException as err:  # noqa: BLE001 - handed to the driver loop (e.g. a caller's interrupt)
                self.error = err
                return

    def raise_error(self) -> None:
        """In the driver loop: an exception raised by on_progress ends the run there, as if raised in it."""
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


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
    listed = check_uris(src.paths(), job.storage)  # weights on object storage: listed here, staged by each node
    if src.sha256 is not None:  # a pinned release: every file the actors would stage needs its digest
        paths = src.paths()
        unpinned = [paths[name].rstrip("/") + (f"/{rel}" if rel else "") for name, files in listed.items()
                    for rel in files if (paths[name].rstrip("/") + (f"/{rel}" if rel else "")) not in src.sha256]
        if unpinned:
            raise ValueError(f"{len(unpinned)} weight file(s) have no sha256 pin, e.g. {unpinned[:3]}; add them to "
                             "the --weights-sha256 list (sha256sum output of the whole WEIGHTS folder)")


def check_paths_reach_nodes(job: UpscaleJob) -> None:
    """Local SRC/DST/cache/weights paths mean another disk on another machine: refuse unless --shared-fs."""
    src = job.model.source
    ray_runtime.check_local_paths_reach_nodes(
        [("SRC", job.src), ("DST", job.dst), ("--cache-semantic", job.cache_semantic),
         ("weights", src.sd_base if src else None)], job.shared_fs)


def _model_id(job: UpscaleJob) -> str:
    src = job.model.source
    return f"{job.model.name}:{src.revision}" if src else f"{job.model.name}:random"


def dry_run(job: UpscaleJob) -> dict:
    """What would run: counts to process/skip and the pools asked for; loads no model, leaves nothing behind.

    Planning runs as Ray tasks (an embedded local Ray when no address is given); its pieces go under
    DST/_state/plan/<id>/ and are removed after, so DST must be writable and reach every node, as for the run.
    """
    check_paths(job)
    ray_runtime.connect(job.address)
    check_paths_reach_nodes(job)
    fs, dst_path = filesystem(job.dst, job.storage)
    new_dst = is_local(fs) and not os.path.exists(dst_path)
    try:
        plan = make_plan(job, write=False)
    finally:
        if new_dst:  # the planning pieces made DST: leave no folder behind
            _prune_empty(dst_path)
    try:
        pools = plan_pools(job, nodes=ray_runtime.alive_nodes(), autoscale=ray_runtime.autoscaling_node_types(),
                           todo=plan.to_process)
    except ValueError as err:  # what the real run would refuse, said instead of a pool plan
        pools = {"error": str(err)}
    return {
        "images": plan.total,
        "to_process": plan.to_process,
        "to_skip": plan.skipped,
        "listing_reused": plan.listing_cached,
        "listed_at": plan.listed_at,
        "params_hash": job.params_hash(),
        "plan_buckets": plan.buckets,
        "pools": pools,
        "first": plan.sample,
    }
