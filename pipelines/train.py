"""`ugcsr train`: fine-tuning on the `build-trainset` shards with Ray Train (V2 TorchTrainer, DDP).

Driver: lists TRAINSET's shards (a held-out shard for validation pictures), builds
the Ray Data stream (read_parquet -> CPU decode/tokenise actors -> shuffle), and
runs a TorchTrainer whose storage is RUN. Workers: the recipe of
srmodel.train (loss, accumulation, clipping), checkpoints via ray.train.report
every C optimizer steps, metrics and validation pictures from rank 0. Re-running
the same command resumes from RUN's latest checkpoint; a failed worker group is
restarted by FailureConfig and resumes the same way. The final checkpoint is
exported to RUN/export/checkpoint-<step>/{unet,controlnet} (released layout).

RUN layout: train/checkpoint-<step:08d>/ (Ray Train's checkpoints), export/,
metrics.parquet, loss.png, validation/ (the held-out LR/GT inputs), train_job.json.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster import ray_runtime
from cluster.storage import StorageConfig, filesystem, is_remote, join, read_bytes, write_bytes_atomic
from srmodel.config import ModelConfig
from srmodel.train.config import TrainRecipe

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_FILES = {"state.json", "trainable.safetensors", "optimizer.pt", "rng.pt", "metrics.parquet"}
METRICS_SCHEMA = pa.schema([("step", pa.int64()), ("loss", pa.float64()), ("lr", pa.float64()),
                            ("grad_norm", pa.float64()), ("samples_per_s", pa.float64()), ("epoch", pa.int64()),
                            ("time", pa.float64())])


class TrainJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    trainset: str = Field(description="folder/prefix with shard-*.parquet from build-trainset")
    run: str = Field(description="run folder/prefix: checkpoints, export, metrics (re-using it resumes)")
    model: ModelConfig
    recipe: TrainRecipe = TrainRecipe()
    max_steps: int = Field(ge=1, description="optimizer steps in total (a resumed run continues up to it)")
    checkpoint_every: int = Field(10_000, ge=1, description="optimizer steps between checkpoints (authors: 10k)")
    validate_every: int | None = Field(None, ge=1, description="steps between validation pictures (a multiple "
                                       "of checkpoint_every; default: every checkpoint)")
    val_images: int = Field(4, ge=0, description="held-out LR images super-resolved at each validation")
    holdout_shards: int | None = Field(None, ge=0, description="shards kept out of training for validation "
                                       "(default: 1 when there are at least 2)")
    workers: int = Field(1, ge=1)
    gpus_per_worker: float | None = Field(None, ge=0, description="default: 1 if the cluster has GPUs, else 0 (gloo)")
    cpus_per_worker: float = Field(1.0, gt=0)
    shuffle: bool = Field(True, description="block order + local shuffle buffer; false reproduces the authors")
    shuffle_buffer: int = Field(64, ge=1, description="rows in each worker's local shuffle buffer")
    decode_actors: int = Field(2, ge=1, description="CPU actors decoding PNGs and tokenising prompts")
    decode_cpus: float = Field(0.5, gt=0)
    decode_batch: int = Field(8, ge=1)
    materialize: bool = Field(False, description="decode the training set once into Ray's object store; epochs "
                              "then skip the decode stage (small sets with many epochs; it must fit in memory)")
    data_cpu_limit: float | None = Field(None, gt=0, description="cap on the CPUs Ray Data may use (shared clusters)")
    max_failures: int = Field(3, ge=0, description="worker-group restarts (each resumes from the last checkpoint)")
    keep_checkpoints: int | None = Field(None, ge=1, description="keep only the newest N (default: all)")
    log_every: int = Field(1, ge=1, description="optimizer steps between progress lines")
    run_name: str = Field("train", pattern=r"^[A-Za-z0-9_.-]+$")
    storage: StorageConfig = StorageConfig()
    address: str | None = None

    @field_validator("trainset", "run")
    @classmethod
    def _absolute_local(cls, v: str) -> str:
        return v if is_remote(v) else os.path.abspath(os.path.expanduser(v.removeprefix("file://")))

    @model_validator(mode="after")
    def _check(self):
        v = self.validate_every
        if v is not None and v % self.checkpoint_every:
            raise ValueError(f"validate_every ({v}) must be a multiple of checkpoint_every ({self.checkpoint_every}): "
                             "validation pictures are saved beside a checkpoint")
        return self


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


# ---------------------------------------------------------------------------------------------- storage


def list_shards(trainset: str, storage: StorageConfig) -> list[str]:
    """The shard files only (never _manifest/), sorted: the unshuffled order is the build order."""
    fs, root = filesystem(trainset, storage)
    if not fs.isdir(root):
        raise FileNotFoundError(f"TRAINSET {trainset} is not a folder/prefix (expected build-trainset's output)")
    paths = sorted(fs.glob(root.rstrip("/") + "/shard-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"TRAINSET {trainset} holds no shard-*.parquet; build it with `ugcsr build-trainset`")
    return paths


def arrow_filesystem(uri: str, storage: StorageConfig):
    """(pyarrow filesystem or None, path) for Ray: object stores go through our fsspec config (endpoint, retries)."""
    if not is_remote(uri):
        return None, uri
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri, storage)
    return PyFileSystem(FSSpecHandler(fs)), path


def _row_counts(paths: list[str], storage: StorageConfig, trainset: str) -> list[int]:
    fs, _ = filesystem(trainset, storage)
    counts = []
    for p in paths:
        with fs.open(p, "rb") as f:
            counts.append(pq.ParquetFile(f).metadata.num_rows)
    return counts


def _write_png(uri: str, image: np.ndarray, storage: StorageConfig) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    write_bytes_atomic(uri, buf.getvalue(), storage)


def write_metrics(run: str, rows: list[dict], storage: StorageConfig) -> None:
    """RUN/metrics.parquet (one row per optimizer step) and RUN/loss.png."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=METRICS_SCHEMA), buf)
    write_bytes_atomic(join(run, "metrics.parquet"), buf.getvalue(), storage)
    if rows:
        write_bytes_atomic(join(run, "loss.png"), loss_plot(rows), storage)


def loss_plot(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="loss")
    window = max(1, len(loss) // 50)
    if window > 1:  # a running mean: the per-step loss of diffusion training is very noisy (random t)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("epsilon MSE")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- worker side


def _microbatches(shard, job: TrainJob, world: int, start_epoch: int, skip: int, per_epoch: int):
    """(epoch, index in epoch, batch) forever; the first `skip` batches of `start_epoch` are passed over (resume)."""
    epoch = start_epoch
    while True:
        seen = 0
        kwargs = {}
        if job.shuffle:
            kwargs = dict(local_shuffle_buffer_size=job.shuffle_buffer,
                          local_shuffle_seed=job.recipe.seed * 100_003 + epoch)
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=job.recipe.batch_size, drop_last=True, **kwargs)):
            seen += 1
            if epoch == start_epoch and i < skip:
                continue
            yield epoch, i, batch
        if seen == 0:
            raise RuntimeError(f"the training data yields no batch per worker: {world} workers x batch "
                               f"{job.recipe.batch_size} needs at least {world * job.recipe.batch_size} rows")
        epoch += 1


def _validate(parts, trainer, val_rows: list[dict], folder: Path) -> None:
    """Super-resolve the held-out LR images with the current weights (rank 0), PNGs into folder."""
    from PIL import Image

    from actors.decode import decode_image
    from srmodel.prompts import build_prompt
    from srmodel.seeds import seed_for
    from srmodel.train.step import unwrap
    from srmodel.upscaler import SemanticUpscaler, SRRequest

    model = unwrap(trainer.model)
    model.eval()
    try:
        up = SemanticUpscaler(model.unet, model.controlnet, parts.vae, parts.text, parts.config, trainer.device)
        up.scheduler_folder = parts.config.source.sd_base
        s = parts.config.sampler
        folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad(), trainer.autocast():
            for k, row in enumerate(val_rows):
                lr, _ = decode_image(row["lr_png"])
                tokens = parts.encoder.encode([lr])[0]
                prompt = build_prompt(row["prompt"].rstrip(","), s.user_prompt, s.added_prompt,
                                      added_first=s.added_prompt_first)
                sr = up.upscale([SRRequest(lr, tokens, prompt, seed_for(row["unit_id"]))])[0]
                Image.fromarray(sr).save(folder / f"{k:02d}-sr.png")
    finally:
        model.train()


def _hms(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from srmodel.loader import resolve
    from srmodel.train import Trainer, load_train_parts

    job = TrainJob.model_validate(config["job"])
    recipe = job.recipe
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # Ray pins workers to OMP_NUM_THREADS=1
        torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    parts = load_train_parts(resolve(job.model), recipe, device)
    model = ray.train.torch.prepare_model(parts.model, parallel_strategy_kwargs={"find_unused_parameters": False})
    trainer = Trainer(parts, recipe, device, model=model)

    step, epoch, samples_in_epoch, rows = 0, 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = trainer.load(folder)
            step, epoch, samples_in_epoch = state["step"], state["epoch"], state["samples_in_epoch"]
            metrics = Path(folder) / "metrics.parquet"
            rows = pq.read_table(metrics).to_pylist() if metrics.exists() else []
        rows = [r for r in rows if r["step"] <= step]
    if step >= job.max_steps:
        return

    queue = config.get("queue")
    if checkpoint is not None and rank == 0 and queue is not None:
        queue.put_nowait(f"resumed from {checkpoint_name(step)} (epoch {epoch}, {samples_in_epoch} samples into it)")
    per_worker_rows = config["train_rows"] // world  # streaming_split(equal=True) drops the remainder
    per_epoch = per_worker_rows // recipe.batch_size
    skip = samples_in_epoch // (world * recipe.batch_size)
    batches = _microbatches(ray.train.get_dataset_shard("train"), job, world, epoch, skip, per_epoch)
    samples_per_step = world * recipe.batch_size * recipe.grad_accum
    validate_every = job.validate_every or job.checkpoint_every
    started, last, first_step = time.perf_counter(), time.perf_counter(), step

    while step < job.max_steps:
        items = [next(batches) for _ in range(recipe.grad_accum)]
        lr = trainer.lr
        loss = trainer.accumulate([b for _, _, b in items], [e for e, _, _ in items])
        if world > 1:  # the logged loss is the global mean, not rank 0's
            t = torch.tensor([loss], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            loss = float(t) / world
        grad_norm = trainer.step()
        step += 1
        epoch, index = items[-1][0], items[-1][1]
        samples_in_epoch = (index + 1) * world * recipe.batch_size
        if per_epoch and index + 1 >= per_epoch:
            epoch, samples_in_epoch = epoch + 1, 0
        now = time.perf_counter()
        rows.append({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                     "samples_per_s": samples_per_step / max(now - last, 1e-9), "epoch": epoch, "time": time.time()})
        last = now
        if rank == 0 and queue is not None and (step % job.log_every == 0 or step == job.max_steps):
            rate = (step - first_step) * samples_per_step / (now - started)
            eta = (job.max_steps - step) * (now - started) / (step - first_step)
            queue.put_nowait(f"step {step}/{job.max_steps}  loss {loss:.4f}  lr {lr:.2e}  grad_norm {grad_norm:.3f}  "
                             f"{rate:.2f} samples/s  ETA {_hms(eta)}")
        if step % job.checkpoint_every == 0 or step == job.max_steps:
            name = checkpoint_name(step)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    trainer.save(tmp, {"step": step, "epoch": epoch, "samples_in_epoch": samples_in_epoch,
                                       "world_size": world, "batch_size": recipe.batch_size,
                                       "grad_accum": recipe.grad_accum, "seed": recipe.seed})
                    pq.write_table(pa.Table.from_pylist(rows, schema=METRICS_SCHEMA), Path(tmp) / "metrics.parquet")
                    if config.get("val_rows") and step % validate_every == 0:
                        _validate(parts, trainer, config["val_rows"], Path(tmp) / "validation")
                    ckpt = Checkpoint.from_directory(tmp)
                ray.train.report({"step": step, "loss": loss, "epoch": epoch}, checkpoint=ckpt,
                                 checkpoint_dir_name=name)
            if rank == 0:
                write_metrics(job.run, rows, job.storage)
                if queue is not None:
                    queue.put_nowait(f"checkpoint {name} saved")


# ---------------------------------------------------------------------------------------------- driver


def _held_out(job: TrainJob, shards: list[str]) -> tuple[list[str], list[str]]:
    hold = job.holdout_shards if job.holdout_shards is not None else (1 if len(shards) >= 2 and job.val_images else 0)
    if hold >= len(shards):
        raise ValueError(f"holdout_shards={hold} leaves no training shard (TRAINSET has {len(shards)})")
    return shards[: len(shards) - hold], shards[len(shards) - hold:]


def _val_rows(job: TrainJob, held: list[str]) -> list[dict]:
    fs, _ = filesystem(job.trainset, job.storage)
    rows = []
    for p in held:
        with fs.open(p, "rb") as f:
            rows += pq.read_table(f, columns=["unit_id", "lr_png", "gt_png", "prompt"]).to_pylist()
        if len(rows) >= job.val_images:
            break
    return rows[: job.val_images]


def _save_job(job: TrainJob) -> None:
    """RUN/train_job.json: what the run was started with (export needs the model and init)."""
    uri = join(job.run, "train_job.json")
    fs, path = filesystem(uri, job.storage)
    text = json.dumps(job.model_dump(mode="json"), indent=2)
    if fs.exists(path):
        old = json.loads(fs.cat_file(path))
        if old.get("model") != json.loads(text)["model"] or old.get("recipe", {}).get("init") != job.recipe.init:
            raise ValueError(f"{job.run} holds a run of another model ({uri}); use a new RUN folder for it")
    write_bytes_atomic(uri, text.encode(), job.storage)


def dataset(job: TrainJob, paths: list[str], tokenizer_folder: str):
    import ray.data
    from ray.data import ActorPoolStrategy

    from actors.train_data import TrainDecode

    fs, _ = arrow_filesystem(job.trainset, job.storage)
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["unit_id", "gt_png", "lr_png", "prompt"])
    if job.shuffle:
        ds = ds.randomize_block_order(seed=job.recipe.seed)
    return ds.map_batches(TrainDecode, fn_constructor_kwargs={"tokenizer_folder": tokenizer_folder},
                          batch_size=job.decode_batch, num_cpus=job.decode_cpus,
                          compute=ActorPoolStrategy(size=job.decode_actors))


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
    from srmodel.loader import resolve

    started = time.perf_counter()
    model = resolve(job.model)  # tiny: built here once, workers on this node reuse the cache
    shards = list_shards(job.trainset, job.storage)
    train_paths, held = _held_out(job, shards)
    counts = _row_counts(train_paths, job.storage, job.trainset)
    if sum(counts) < job.workers * job.recipe.batch_size:
        raise ValueError(f"TRAINSET has {sum(counts)} training rows, fewer than workers x batch size "
                         f"({job.workers} x {job.recipe.batch_size})")
    val_rows = _val_rows(job, held) if job.val_images else []
    _save_job(job)
    for k, r in enumerate(val_rows):  # the inputs, once, to compare the checkpoints' pictures with
        from actors.decode import decode_image

        _write_png(join(job.run, "validation", f"{k:02d}-lr.png"), decode_image(r["lr_png"])[0], job.storage)
        _write_png(join(job.run, "validation", f"{k:02d}-gt.png"), decode_image(r["gt_png"])[0], job.storage)

    done = _checkpoints(job)
    if done and max(done) >= job.max_steps:  # nothing to train: only make sure the latest is exported
        log(f"{job.run} is already at step {max(done)} (--max-steps {job.max_steps}): exporting only")
        return _finish(job, done[max(done)], started)

    ray_runtime.connect(job.address, num_cpus=num_cpus)
    import ray.data
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    ray.data.DataContext.get_current().enable_progress_bars = False
    gpus = job.gpus_per_worker if job.gpus_per_worker is not None else (1.0 if ray_runtime.cluster_gpus() else 0.0)
    ds = dataset(job, train_paths, str(Path(model.source.sd_base) / "tokenizer"))
    if job.materialize:
        ds = ds.materialize()
    options = ray.data.ExecutionOptions(preserve_order=not job.shuffle)
    if job.data_cpu_limit:
        options.resource_limits = options.resource_limits.copy(cpu=job.data_cpu_limit)
    storage_fs, storage_path = arrow_filesystem(job.run, job.storage)
    queue = Queue(actor_options={"num_cpus": 0})
    loop_config = {"job": job.model_copy(update={"model": model}).model_dump(mode="json"), "val_rows": val_rows,
                   "train_rows": sum(counts), "queue": queue}
    resources = {"CPU": job.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(
            name=job.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.keep_checkpoints),
        ),
        datasets={"train": ds},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=options),
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
    done = _checkpoints(job)
    if not done:
        raise RuntimeError(f"training produced no checkpoint under {join(job.run, job.run_name)}")
    return _finish(job, done[max(done)], started)


def _checkpoints(job: TrainJob) -> dict[int, str]:
    """{step: path} of RUN's complete checkpoints (every file of one there: an upload cut short does not count)."""
    fs, root = filesystem(join(job.run, job.run_name), job.storage)
    files: dict[str, set] = {}
    for path in fs.glob(root.rstrip("/") + f"/{CHECKPOINT_PREFIX}*/*"):
        files.setdefault(posixpath.dirname(path), set()).add(posixpath.basename(path))
    found = {}
    for folder, names in files.items():
        step = posixpath.basename(folder)[len(CHECKPOINT_PREFIX):]
        if step.isdigit() and CHECKPOINT_FILES <= names:
            found[int(step)] = folder
    return found


def _finish(job: TrainJob, checkpoint: str, started: float) -> dict:
    """metrics.parquet + loss.png from the checkpoint's history, and its export."""
    fs, _ = filesystem(job.run, job.storage)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("state.json", "metrics.parquet", "trainable.safetensors"):
            Path(tmp, name).write_bytes(fs.cat_file(posixpath.join(checkpoint, name)))
        state = json.loads(Path(tmp, "state.json").read_text())
        rows = pq.read_table(Path(tmp) / "metrics.parquet").to_pylist()
        write_metrics(job.run, rows, job.storage)
        export = export_checkpoint(job.run, tmp, state["step"], job.storage)
    return {"step": state["step"], "export": export, "checkpoint": checkpoint_name(state["step"]),
            "steps_logged": len(rows), "wall_s": round(time.perf_counter() - started, 2)}


def export_checkpoint(run: str, folder: str | Path, step: int, storage: StorageConfig) -> str:
    """RUN/export/checkpoint-<step>/{unet,controlnet} from a training checkpoint folder; an existing export is kept."""
    from safetensors.torch import load_file

    from srmodel.loader import resolve
    from srmodel.train.model import export_pretrained

    target = join(run, "export", f"checkpoint-{step}")
    fs, path = filesystem(target, storage)
    if fs.exists(posixpath.join(path, "controlnet", "config.json")) and fs.exists(posixpath.join(path, "unet", "config.json")):
        return target  # never overwritten: the same step always holds the same weights
    saved = TrainJob.model_validate(json.loads(read_bytes(join(run, "train_job.json"), storage)))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "export"
        export_pretrained(resolve(saved.model), saved.recipe, load_file(str(Path(folder) / "trainable.safetensors")), local)
        for file in sorted(local.rglob("*")):
            if file.is_file():
                write_bytes_atomic(join(target, *file.relative_to(local).parts), file.read_bytes(), storage)
    return target


def export_run(run: str, step: int | None, storage: StorageConfig, run_name: str = "train") -> str:
    """Export one checkpoint of RUN (the latest by default), e.g. to compare an earlier one."""
    saved = TrainJob.model_validate(json.loads(read_bytes(join(run, "train_job.json"), storage)))
    done = _checkpoints(saved.model_copy(update={"run": run, "storage": storage, "run_name": run_name}))
    if not done:
        raise FileNotFoundError(f"{join(run, run_name)} holds no checkpoint")
    step = max(done) if step is None else step
    if step not in done:
        raise FileNotFoundError(f"no checkpoint for step {step} in {join(run, run_name)}; have {sorted(done)}")
    fs, _ = filesystem(run, storage)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "trainable.safetensors").write_bytes(fs.cat_file(posixpath.join(done[step], "trainable.safetensors")))
        return export_checkpoint(run, tmp, step, storage)
