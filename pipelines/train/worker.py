"""What runs inside each Ray Train worker: `train_loop` (resume, micro-batches, checkpoints), validation, metrics.

The recipe of srmodel.train (loss, accumulation, clipping); checkpoints via ray.train.report every
C optimizer steps; metrics (RUN/metrics.parquet, RUN/loss.png, RUN/tensorboard/, MLflow when a tracking
URI is set), progress lines and validation pictures from rank 0. Ray Train pickles `train_loop` by reference:
it stays a module-level function.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cluster.storage import StorageConfig, join, write_bytes_atomic

from .job import TrainJob, checkpoint_name
from .mlflow_log import MlflowRun
from .resume import reads_on
from .tensorboard import write_events

METRICS_SCHEMA = pa.schema([("step", pa.int64()), ("loss", pa.float64()), ("lr", pa.float64()),
                            ("grad_norm", pa.float64()), ("samples_per_s", pa.float64()), ("epoch", pa.int64()),
                            ("time", pa.float64()), ("val_loss", pa.float64())])
VAL_TIMESTEPS = (100, 300, 500, 700, 900)  # the held-out loss: epsilon-MSE at these t, fixed seeds, captions kept


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


def _microbatches(shard, job: TrainJob, world: int, start_epoch: int, skip: int, rest=None):
    """(epoch, index in epoch, batch) forever. A resume mid-epoch either reads the epoch on from `rest` (the "resume"
    shard: its rows before the checkpoint never read, resume.py) or passes over the first `skip` batches."""
    epoch = start_epoch
    if rest is not None:
        for i, batch in enumerate(_epoch_batches(rest, job, epoch)):
            yield epoch, skip + i, batch
        epoch, skip = epoch + 1, 0
    while True:
        seen = 0
        for i, batch in enumerate(_epoch_batches(shard, job, epoch)):
            seen += 1
            if epoch == start_epoch and i < skip:
                continue
            yield epoch, i, batch
        if seen == 0:
            raise RuntimeError(f"the training data yields no batch per worker: {world} workers x batch "
                               f"{job.recipe.batch_size} needs at least {world * job.recipe.batch_size} rows")
        epoch += 1


def _epoch_batches(shard, job: TrainJob, epoch: int):
    kwargs = {}
    if job.shuffle:  # each epoch its own local shuffle
        kwargs = {"local_shuffle_buffer_size": job.shuffle_buffer,
                  "local_shuffle_seed": job.recipe.seed * 100_003 + epoch}
    return shard.iter_torch_batches(batch_size=job.recipe.batch_size, drop_last=True, **kwargs)


def _held_out_batch(parts, val_rows: list[dict]) -> dict | None:
    """The held-out pairs as a training micro-batch (decoded and tokenised as the data stage does)."""
    from actors.train_data import TrainDecode

    if not val_rows:
        return None
    cols = {c: [r[c] for r in val_rows] for c in ("gt_png", "lr_png", "prompt", "unit_id")}
    decoded = TrainDecode(tokenizer=parts.text.tokenizer)(cols)
    return {k: torch.from_numpy(v) for k, v in decoded.items()} if len(decoded["key"]) else None


def validation_prompts(parts, val_rows: list[dict]) -> list[str]:
    """The held-out LR images' prompts as `ugcsr upscale` makes them: the preset's tagger (RAM+DAPE, or its fixed
    tags) on the LR image, not the trainset's prompt (tagged on the GT). Once per run, on the CPU (the training
    GPU's memory is the model's); the tagger is freed after."""
    from actors.decode import decode_image
    from srmodel.stages import load_tagger

    tagger = load_tagger(parts.config, "cpu")
    try:
        with torch.no_grad():
            tags = tagger([decode_image(r["lr_png"])[0] for r in val_rows])
    finally:
        del tagger
    return _prompts(parts, tags)


def _prompts(parts, tags: list[str]) -> list[str]:
    from srmodel.prompts import build_prompt

    s = parts.config.sampler
    return [build_prompt(t, s.user_prompt, s.added_prompt, added_first=s.added_prompt_first) for t in tags]


def _validate(parts, trainer, val_rows: list[dict], prompts: list[str], folder: Path) -> None:
    """Super-resolve the held-out LR images with the current weights (rank 0), PNGs into folder."""
    from PIL import Image

    from actors.decode import decode_image
    from srmodel.sampling.seeds import seed_for
    from srmodel.train.step import unwrap
    from srmodel.upscaler import SemanticUpscaler, SRRequest

    model = unwrap(trainer.model)
    model.eval()
    try:
        # At the trainset's own scale (x4 pairs are validated at x4, whatever the preset's sampler says).
        lr0, gt0 = decode_image(val_rows[0]["lr_png"])[0], decode_image(val_rows[0]["gt_png"])[0]
        s = parts.config.sampler.model_copy(update={"upscale": max(1, round(gt0.shape[1] / lr0.shape[1]))})
        config = parts.config.model_copy(update={"sampler": s})
        up = SemanticUpscaler(model.unet, model.controlnet, parts.vae, parts.text, config, trainer.device)
        up.scheduler_folder = parts.config.source.sd_base
        folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad(), trainer.autocast():
            for k, row in enumerate(val_rows):
                lr, _ = decode_image(row["lr_png"])
                tokens = parts.encoder.encode([lr])[0]
                sr = up.upscale([SRRequest(lr, tokens, prompts[k], seed_for(row["unit_id"]))])[0]
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
    from PIL import Image
    from ray.train import Checkpoint

    from actors.staging import staged_model, staged_path
    from srmodel.stages import resolve
    from srmodel.train import Trainer, load_train_parts

    job = TrainJob.model_validate(config["job"])
    # Weights on object storage (--weights / --seesr-init s3://...) are staged once per node, as upscale's actors do.
    recipe = job.recipe.model_copy(update={"seesr_init": staged_path(job.recipe.seesr_init, job.storage)})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # Ray pins workers to OMP_NUM_THREADS=1
        torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    parts = load_train_parts(staged_model(resolve(job.model), job.storage), recipe, device)
    model = ray.train.torch.prepare_model(parts.model, parallel_strategy_kwargs={"find_unused_parameters": False})
    trainer = Trainer(parts, recipe, device, model=model)

    step, epoch, samples_in_epoch, rows, state = 0, 0, 0, [], None
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
    per_worker_rows = config["train_rows"] // world  # streaming_split(equal=True) drops the remainder
    per_epoch = per_worker_rows // recipe.batch_size
    skip = samples_in_epoch // (world * recipe.batch_size)
    plan = reads_on(job, state, world)  # every rank decides alike: get_dataset_shard is a barrier over them
    if checkpoint is not None and rank == 0 and queue is not None:
        how = (f"reading it on from there ({plan['shards_left']} shard(s) left; its first {samples_in_epoch} rows are "
               "not decoded again)" if plan else f"passing over its first {skip} batches" if skip else "at its start")
        queue.put_nowait(f"resumed from {checkpoint_name(step)} (epoch {epoch}, {samples_in_epoch} samples into it): "
                         + how)
    batches = _microbatches(ray.train.get_dataset_shard("train"), job, world, epoch, skip,
                            ray.train.get_dataset_shard("resume") if plan else None)
    samples_per_step = world * recipe.batch_size * recipe.grad_accum
    val_batch = _held_out_batch(parts, config.get("val_rows") or []) if rank == 0 else None
    val_prompts = None  # made by the tagger at the first validation
    logged, images = step, {}  # the last step in RUN/tensorboard; validation pictures for the next event file
    say = queue.put_nowait if queue is not None else (lambda line: None)
    tracker = MlflowRun(config["mlflow"], job.run, job.run_name, job.storage) if rank == 0 and config.get("mlflow") \
        else None
    if tracker is not None:
        tracker.start(say)  # best effort: opens (or continues) the MLflow run and logs its params
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
                    if val_batch is not None:
                        rows[-1]["val_loss"] = trainer.held_out_loss(val_batch, VAL_TIMESTEPS)
                        if queue is not None:
                            queue.put_nowait(f"held-out loss at step {step}: {rows[-1]['val_loss']:.4f} "
                                             f"(epsilon-MSE at t = {', '.join(map(str, VAL_TIMESTEPS))})")
                    pq.write_table(pa.Table.from_pylist(rows, schema=METRICS_SCHEMA), Path(tmp) / "metrics.parquet")
                    if config.get("val_rows") and step % validate_every == 0:
                        try:  # best effort: a failing validation must never cost the checkpoint it belongs to
                            if val_prompts is None:  # once: a tagger that cannot load is not retried
                                try:
                                    val_prompts = validation_prompts(parts, config["val_rows"])
                                    said = f"validation prompts (tagger on the LR): {val_prompts}"
                                except Exception as err:  # noqa: BLE001 - the trainset's prompts will do
                                    val_prompts = _prompts(parts, [r["prompt"].rstrip(",") for r in config["val_rows"]])
                                    said = f"validation prompts from the trainset (the tagger failed: {err!r})"
                                if queue is not None:
                                    queue.put_nowait(said)
                            _validate(parts, trainer, config["val_rows"], val_prompts, Path(tmp) / "validation")
                            images = {p.stem: np.asarray(Image.open(p).convert("RGB"))
                                      for p in sorted((Path(tmp) / "validation").glob("*-sr.png"))}
                        except Exception as err:  # noqa: BLE001 - logged, training goes on
                            shutil.rmtree(Path(tmp) / "validation", ignore_errors=True)
                            if queue is not None:
                                queue.put_nowait(f"validation at step {step} failed (checkpoint kept): {err!r}")
                    ckpt = Checkpoint.from_directory(tmp)
                ray.train.report({"step": step, "loss": loss, "epoch": epoch}, checkpoint=ckpt,
                                 checkpoint_dir_name=name)
            if rank == 0:
                write_metrics(job.run, rows, job.storage)
                try:  # best effort, like validation: TensorBoard files never cost a checkpoint
                    write_events(job.run, [r for r in rows if r["step"] > logged], step, job.storage, images)
                    logged = step
                except Exception as err:  # noqa: BLE001 - logged, training goes on
                    if queue is not None:
                        queue.put_nowait(f"TensorBoard events at step {step} failed: {err!r}")
                if tracker is not None:  # best effort too: a failure is a line, the backlog goes at the next one
                    tracker.checkpoint(rows, step, images, step == job.max_steps, say)
                images = {}
                if queue is not None:
                    queue.put_nowait(f"checkpoint {name} saved")
