"""`ugcsr train`'s driver: `run_train` starts Ray Train, prints progress, finds RUN's checkpoints, exports.

Fine-tuning on the `build-trainset` shards with Ray Train (V2 TorchTrainer, DDP). The driver
lists TRAINSET's shards (a held-out shard for validation pictures) and builds the Ray Data
stream (`data`), then runs a TorchTrainer whose storage is RUN over the per-worker loop
(`worker`). Re-running the same command resumes from RUN's latest checkpoint; a failed worker
group is restarted by FailureConfig and resumes the same way. The final checkpoint is
exported to RUN/export/checkpoint-<step>/{unet,controlnet} (released layout).

RUN layout: train/checkpoint-<step:08d>/ (Ray Train's checkpoints), export/,
metrics.parquet, loss.png, tensorboard/, validation/ (the held-out LR/GT inputs), train_job.json,
resume_plan.json (where a streaming resume reads on from, `resume`), mlflow_run.json (when an MLflow
tracking URI is set: the MLflow run a resume continues).
"""

from __future__ import annotations

import io
import json
import posixpath
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cluster import ray_runtime
from cluster.storage import StorageConfig, filesystem, join, read_bytes, write_bytes_atomic
from cluster.weights import check_uris

from .data import arrow_filesystem, dataset, held_out, list_shards, row_counts, stream_order, validation_rows
from .job import TRAIN_WORKER_MEMORY_GB, TrainJob, checkpoint_name
from .mlflow_log import local_store_path, resolve_tracking, run_params
from .resume import RestOfEpoch, checkpoints
from .worker import train_loop, write_metrics


def _write_png(uri: str, image: np.ndarray, storage: StorageConfig) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    write_bytes_atomic(uri, buf.getvalue(), storage)


def _save_job(job: TrainJob) -> None:
    """RUN/train_job.json: what the run was started with (export needs the model and init)."""
    uri = join(job.run, "train_job.json")
    fs, path = filesystem(uri, job.storage)
    text = json.dumps(job.model_dump(mode="json"), indent=2)
    if fs.exists(path):
        old = json.loads(fs.cat_file(path))
        start = (old.get("recipe", {}).get("init"), old.get("recipe", {}).get("seesr_init"))
        if old.get("model") != json.loads(text)["model"] or start != (job.recipe.init, job.recipe.seesr_init):
            raise ValueError(f"{job.run} holds a run of another model ({uri}); use a new RUN folder for it")
        was = old.get("recipe", {}).get("optimizer")
        if was not in (None, "auto", job.recipe.optimizer):  # older runs recorded `auto`
            raise ValueError(f"{job.run} was trained with optimizer {was}, this run would use {job.recipe.optimizer} "
                             "(its saved state cannot be resumed by another optimizer); set optimizer: "
                             f"{was} in the recipe, or use a new RUN folder")
    write_bytes_atomic(uri, text.encode(), job.storage)


def worker_resources(job: TrainJob, gpus: float, model_name: str) -> dict:
    """Ray resources per training worker. Host memory (Ray then never packs more workers on a node than it
    holds): the measured peak of loading the parts plus 25 % (docs/performance.md "Memory"), on GPU clusters
    and for the full-size model only, unless `memory_gb` says otherwise."""
    memory = job.memory_gb if job.memory_gb is not None else (
        TRAIN_WORKER_MEMORY_GB if gpus and model_name != "tiny" else 0.0)
    return {"CPU": job.cpus_per_worker, **({"GPU": gpus} if gpus else {}),
            **({"memory": memory * 2**30} if memory else {})}


def _print_progress(queue, stop: threading.Event, log) -> None:
    from ray.util.queue import Empty

    while not stop.is_set():
        try:
            log(queue.get(timeout=0.5))
        except Empty:
            continue
        except Exception:  # noqa: BLE001 - the queue actor is gone at shutdown: progress lines are best effort
            return


def run_train(job: TrainJob, *, num_cpus: int | None = None, log=print) -> dict:
    """Train (or resume) to job.max_steps, export the final checkpoint; returns a summary."""
    from srmodel.stages import resolve

    started = time.perf_counter()
    # MLflow (a tracking URI set): resolved once here, for the workers; a URI mlflow cannot use is refused first.
    tracking = resolve_tracking(job)
    model = resolve(job.model)  # tiny: built here once, workers on this node reuse the cache
    # Weights on object storage: listed here (a typo fails now), staged by each node's workers and decoders.
    check_uris({**model.source.paths(), "seesr_init": job.recipe.seesr_init}, job.storage)
    shards = list_shards(job.trainset, job.storage)
    train_paths, held = held_out(job, shards)
    val_rows = validation_rows(job, held, train_paths) if job.val_images else []
    # Validation rows taken from a training shard are kept out of training (held out by unit_id).
    exclude = [] if held else [str(r["unit_id"]) for r in val_rows]
    counts = row_counts(train_paths, job.storage, job.trainset)
    counts[-1] -= len(exclude)  # validation_rows takes them from the last training shard
    if sum(counts) < job.workers * job.recipe.batch_size:
        raise ValueError(f"TRAINSET has {sum(counts)} training rows, fewer than workers x batch size "
                         f"({job.workers} x {job.recipe.batch_size})")
    _warn_if_no_prompts(job, train_paths, log)
    ray_runtime.connect(job.address, num_cpus=num_cpus)
    ray_runtime.check_local_paths_reach_nodes(
        [("TRAINSET", job.trainset), ("RUN", job.run), ("weights", model.source.sd_base),
         ("--seesr-init", job.recipe.seesr_init), ("MLflow tracking URI", local_store_path(tracking))],
        job.shared_fs)
    gpus = worker_gpus(job, model.name, log)
    # One optimizer for every rank and every resume: `auto` is resolved here, once, and kept in train_job.json.
    job = job.model_copy(update={"recipe": job.recipe.model_copy(update={"optimizer": resolved_optimizer(job, gpus)})})
    _save_job(job)
    for k, r in enumerate(val_rows):  # the inputs, once, to compare the checkpoints' pictures with
        from actors.decode import decode_image

        _write_png(join(job.run, "validation", f"{k:02d}-lr.png"), decode_image(r["lr_png"])[0], job.storage)
        _write_png(join(job.run, "validation", f"{k:02d}-gt.png"), decode_image(r["gt_png"])[0], job.storage)

    done = checkpoints(job)
    if done and max(done) >= job.max_steps:  # nothing to train: only make sure the latest is exported
        log(f"{job.run} is already at step {max(done)} (--max-steps {job.max_steps}): exporting only")
        return _finish(job, done[max(done)], started)

    import ray.data
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    ray.data.DataContext.get_current().enable_progress_bars = False
    paths, counts = stream_order(job, train_paths, counts)
    datasets = training_datasets(job, paths, counts, join(model.source.sd_base, "tokenizer"), exclude)
    options = ray.data.ExecutionOptions(preserve_order=not job.shuffle)
    if job.data_cpu_limit:
        options.resource_limits = options.resource_limits.copy(cpu=job.data_cpu_limit)
    storage_fs, storage_path = arrow_filesystem(job.run, job.storage)
    queue = Queue(actor_options={"num_cpus": 0})
    loop_config = {"job": job.model_copy(update={"model": model}).model_dump(mode="json"), "val_rows": val_rows,
                   "train_rows": sum(counts), "queue": queue,
                   "mlflow": tracking and {**tracking, "params": run_params(job, gpus, sum(counts))}}
    resources = worker_resources(job, gpus, model.name)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(
            name=job.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=list(datasets), execution_options=options),
    )
    stop = threading.Event()
    printer = threading.Thread(target=_print_progress, args=(queue, stop, log), daemon=True)
    printer.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        printer.join(timeout=5)
        queue.shutdown()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    done = checkpoints(job)
    if not done:
        raise RuntimeError(f"training produced no checkpoint under {join(job.run, job.run_name)}")
    return _finish(job, done[max(done)], started)


def training_datasets(job: TrainJob, paths: list[str], counts: list[int], tokenizer: str, exclude: list[str]) -> dict:
    """Ray Train's datasets: "train" (each epoch), and for a streaming run "resume" (the rest of the epoch a resume
    lands in, read on from its checkpoint: resume.py). A materialized run decodes once and passes over instead."""
    ds = dataset(job, paths, tokenizer, exclude)
    if not job.materialize:
        return {"train": ds, "resume": RestOfEpoch(job, paths, counts, tokenizer, exclude)}
    # In build order when not shuffled: with two decode actors the blocks would land in whichever order they
    # finish, and a resumed run (a new materialization) would pass over other rows than it trained on.
    ds.context.execution_options.preserve_order = not job.shuffle  # the dataset's own copy of the context
    return {"train": ds.materialize()}


def worker_gpus(job: TrainJob, model_name: str, log=print) -> float:
    """GPUs per worker: the user's, else 1 when the cluster has GPUs now or a GPU node type the autoscaler can add
    (Ray Train then waits for those nodes); a full-size preset on a cluster with neither is refused unless
    allow_cpu (it would train in fp32 on CPUs with gloo)."""
    if job.gpus_per_worker is not None:
        return job.gpus_per_worker
    if ray_runtime.cluster_gpus():
        return 1.0
    if any(t.gpus > 0 for t in ray_runtime.autoscaling_node_types()):
        log(f"no GPU node yet: asking for {job.workers} GPU worker(s); the autoscaler adds GPU nodes for them")
        return 1.0
    if model_name != "tiny" and not job.allow_cpu:
        raise ValueError(f"preset {model_name!r} trains the full-size model and this cluster has no GPU (none now, "
                         "and no autoscaling node type with GPUs); connect to a GPU cluster (--address), or pass "
                         "--allow-cpu to train on CPU anyway (very slow)")
    return 0.0


def resolved_optimizer(job: TrainJob, gpus: float) -> str:
    """`optimizer: auto` for this run: AdamW8bit on GPU workers when bitsandbytes is installed (the image has it,
    the `train-gpu` extra), torch AdamW otherwise. Decided once here, so ranks and resumes never disagree."""
    if job.recipe.optimizer != "auto":
        return job.recipe.optimizer
    if not gpus:
        return "adamw"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "adamw"
    return "adamw8bit"


def _warn_if_no_prompts(job: TrainJob, paths: list[str], log) -> None:
    """A trainset built without the tagger has prompt "" everywhere: every step would train the null prompt."""
    if not paths:
        return
    fs, _ = filesystem(job.trainset, job.storage)
    with fs.open(paths[0], "rb") as f:
        prompts = pq.read_table(f, columns=["prompt"]).column("prompt").to_pylist()
    if prompts and not any(p for p in prompts):
        log(f"WARNING: every prompt in {paths[0]} is empty: training would only ever see the null prompt, "
            "unlike the authors' tag prompts. Build the trainset with prompts: `ram:` (ram_swin_large_14m.pth) "
            "in the build-trainset job YAML captions each GT crop with RAM tags (docs/trainset.md)")


def _finish(job: TrainJob, checkpoint: str, started: float) -> dict:
    """metrics.parquet + loss.png from the checkpoint's history, and its export (in a Ray task: loading the
    model to export it takes ~10 GB at real size, which the head node must not spend)."""
    import ray

    fs, _ = filesystem(job.run, job.storage)
    state = json.loads(fs.cat_file(posixpath.join(checkpoint, "state.json")))
    rows = pq.read_table(io.BytesIO(fs.cat_file(posixpath.join(checkpoint, "metrics.parquet")))).to_pylist()
    write_metrics(job.run, rows, job.storage)
    memory = TRAIN_WORKER_MEMORY_GB if job.model.name != "tiny" else 0.0
    task = ray.remote(num_cpus=1, max_retries=1, **({"memory": memory * 2**30} if memory else {}))(export_from)
    export = ray.get(task.remote(job.run, uri_of_checkpoint(job, checkpoint), state["step"], job.storage))
    return {"step": state["step"], "export": export, "checkpoint": checkpoint_name(state["step"]),
            "steps_logged": len(rows), "wall_s": round(time.perf_counter() - started, 2)}


def uri_of_checkpoint(job: TrainJob, path: str) -> str:
    """A checkpoint folder as `checkpoints` lists it (a path in RUN's filesystem) as a URI any node can read."""
    fs, _ = filesystem(job.run, job.storage)
    return fs.unstrip_protocol(path) if "://" in job.run else path


def export_from(run: str, checkpoint: str, step: int, storage: StorageConfig) -> str:
    """Export RUN's checkpoint folder `checkpoint` (a URI or path); runs wherever it is called (a Ray task)."""
    fs, path = filesystem(checkpoint, storage)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "trainable.safetensors").write_bytes(fs.cat_file(posixpath.join(path, "trainable.safetensors")))
        return export_checkpoint(run, tmp, step, storage)


def export_checkpoint(run: str, folder: str | Path, step: int, storage: StorageConfig) -> str:
    """RUN/export/checkpoint-<step>/{unet,controlnet} from a training checkpoint folder; an existing export is kept."""
    from safetensors.torch import load_file

    from srmodel.stages import resolve
    from srmodel.train.model import export_pretrained

    target = join(run, "export", f"checkpoint-{step}")
    fs, path = filesystem(target, storage)
    if fs.exists(posixpath.join(path, "controlnet", "config.json")) and fs.exists(posixpath.join(path, "unet", "config.json")):
        return target  # never overwritten: the same step always holds the same weights
    from actors.staging import staged_model, staged_path

    saved = TrainJob.model_validate(json.loads(read_bytes(join(run, "train_job.json"), storage)))
    # The weights it starts from, staged on this node when they are on object storage.
    recipe = saved.recipe.model_copy(update={"seesr_init": staged_path(saved.recipe.seesr_init, storage)})
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "export"
        export_pretrained(staged_model(resolve(saved.model), storage), recipe,
                          load_file(str(Path(folder) / "trainable.safetensors")), local)
        for file in sorted(local.rglob("*")):
            if file.is_file():
                write_bytes_atomic(join(target, *file.relative_to(local).parts), file.read_bytes(), storage)
    return target


def export_run(run: str, step: int | None, storage: StorageConfig, run_name: str = "train") -> str:
    """Export one checkpoint of RUN (the latest by default), e.g. to compare an earlier one."""
    saved = TrainJob.model_validate(json.loads(read_bytes(join(run, "train_job.json"), storage)))
    done = checkpoints(saved.model_copy(update={"run": run, "storage": storage, "run_name": run_name}))
    if not done:
        raise FileNotFoundError(f"{join(run, run_name)} holds no checkpoint")
    step = max(done) if step is None else step
    if step not in done:
        raise FileNotFoundError(f"no checkpoint for step {step} in {join(run, run_name)}; have {sorted(done)}")
    fs, _ = filesystem(run, storage)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "trainable.safetensors").write_bytes(fs.cat_file(posixpath.join(done[step], "trainable.safetensors")))
        return export_checkpoint(run, tmp, step, storage)
