"""`ugcsr train` and `ugcsr train-export` (registered on the app in pipelines/cli/app.py; heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from .common import EXIT_JOB, echo_result, err_console, fail, given, load_config, merge, run_command


OPTION_OF = {("trainset",): "trainset", ("run",): "run", ("workers",): "workers", ("gpus_per_worker",): "gpus_per_worker",
             ("recipe", "batch_size"): "batch_size", ("recipe", "grad_accum"): "grad_accum", ("recipe", "lr"): "lr",
             ("recipe", "seed"): "seed", ("recipe", "init"): "init", ("recipe", "seesr_init"): "seesr_init", ("max_steps",): "max_steps",
             ("checkpoint_every",): "checkpoint_every", ("validate_every",): "validate_every",
             ("address",): "address", ("storage", "endpoint_url"): "endpoint_url"}  # job field -> its option


def train(
    trainset: str = typer.Argument(..., metavar="TRAINSET", help="build-trainset output: folder or s3://bucket/prefix with shard-*.parquet"),
    run: str = typer.Argument(..., metavar="RUN", help="run folder or s3:// prefix (checkpoints, export, metrics); re-using it resumes"),
    preset: Optional[Literal["tiny", "wild", "synthetic"]] = typer.Option(
        None, help="model to start from (and validation sampler): wild | synthetic need --weights; tiny (random "
                   "weights, for trials) is the default without --weights"),
    weights: Optional[str] = typer.Option(None, help="folder or s3:// prefix with the released weights; needs --preset"),
    init: Optional[Literal["released", "paper"]] = typer.Option(
        None, help="released (the checkpoint as is) | paper (the authors' start: SD-2-base UNet + --seesr-init's "
                   "image_attentions and ControlNet)"),
    seesr_init: Optional[str] = typer.Option(
        None, "--seesr-init", help="--init paper: the public SeeSR checkpoint (folder or s3:// with unet/ and "
                                   "controlnet/, the authors' preset/models/seesr)"),
    allow_cpu: bool = typer.Option(False, "--allow-cpu", help="train a full-size preset on a cluster without GPUs"),
    shared_fs: bool = typer.Option(False, "--shared-fs", help="local TRAINSET/RUN/weights are on a filesystem every "
                                                              "node mounts"),
    config: Optional[Path] = typer.Option(None, help="train job YAML (examples/train.yaml); options given here override it"),
    workers: Optional[int] = typer.Option(None, help="training workers (one DDP rank each)"),
    gpus_per_worker: Optional[float] = typer.Option(None, help="default: 1 if the cluster has GPUs, else 0 (CPU, gloo)"),
    batch_size: Optional[int] = typer.Option(None, help="per worker per micro-batch (authors: 1)"),
    grad_accum: Optional[int] = typer.Option(None, help="micro-batches per optimizer step (authors: 2)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (authors: 5e-5, constant)"),
    max_steps: Optional[int] = typer.Option(None, help="optimizer steps in total"),
    checkpoint_every: Optional[int] = typer.Option(None, help="optimizer steps between checkpoints"),
    validate_every: Optional[int] = typer.Option(None, help="steps between validation pictures (multiple of --checkpoint-every)"),
    seed: Optional[int] = typer.Option(None, help="seed of all training randomness"),
    no_shuffle: bool = typer.Option(False, "--no-shuffle", help="read the shards in order, as the authors did"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
    print_config: bool = typer.Option(False, "--print-config", help="print the effective job as YAML and exit"),
) -> None:
    """Fine-tune ControlNet + the semantic cross-attention on TRAINSET with Ray Train; exports to RUN/export/.

    Exit codes: 0 done, 2 bad option or setting, 3 the job could not run (TRAINSET missing or
    empty, weights missing, cluster failure).
    """
    options = dict(locals())
    if weights is not None and preset is None:
        raise typer.BadParameter("--weights needs --preset wild or --preset synthetic; tiny is the random-weights "
                                 "test model", param_hint="'--preset'")
    data = load_config(config)
    if seesr_init is not None and "://" not in seesr_init:  # workers may run in another directory
        seesr_init = str(Path(seesr_init).expanduser().absolute())
        for sub in ("unet", "controlnet"):  # remote ones are listed by the driver before anything starts
            if not (Path(seesr_init) / sub / "config.json").is_file():
                raise typer.BadParameter(f"{seesr_init} has no {sub}/config.json; expected the public SeeSR "
                                         "checkpoint folder (unet/ and controlnet/, the authors' preset/models/seesr)",
                                         param_hint="'--seesr-init'")
    from pipelines.train.driver import run_train
    from pipelines.train.job import TrainJob
    from srmodel.presets import get_preset

    from .upscale import _storage, released_source

    source = released_source(weights, preset or "tiny", _storage(data, endpoint_url)) if weights else None
    model = get_preset(preset or "tiny", source).model_dump(mode="json")
    data["model"] = merge(model, data.get("model") or {})
    data["recipe"] = {**(data.get("recipe") or {}),
                      **given(batch_size=batch_size, grad_accum=grad_accum, lr=lr, seed=seed, init=init,
                              seesr_init=seesr_init)}
    data.update(given(trainset=trainset, run=run, workers=workers, address=address, gpus_per_worker=gpus_per_worker,
                      max_steps=max_steps, checkpoint_every=checkpoint_every, validate_every=validate_every,
                      shuffle=False if no_shuffle else None, allow_cpu=allow_cpu or None,
                      shared_fs=shared_fs or None))
    console = err_console()
    run_command(TrainJob, data, option_of=OPTION_OF, options=options, config=config, endpoint_url=endpoint_url,
                print_config=print_config, dry_run=False, plan=None,
                run=lambda job: _run(job, run_train, console), failures=lambda summary: 0, fail_on_error=False)


def _run(job, run_train, console) -> dict:
    summary = run_train(job, log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    echo_result(summary)
    return summary


def train_export(
    run: str = typer.Argument(..., metavar="RUN", help="a run folder or s3:// prefix of `ugcsr train`"),
    step: Optional[int] = typer.Option(None, help="the checkpoint's step (default: the latest)"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
) -> None:
    """Write RUN/export/checkpoint-<step>/{unet,controlnet} (released layout) from a training checkpoint.

    Exit codes: 0 done, 2 bad option, 3 no checkpoint to export (RUN missing or empty).
    """
    from cluster.storage import StorageConfig
    from pipelines.train.driver import export_run

    try:
        echo_result(export_run(run, step, StorageConfig(endpoint_url=endpoint_url)))
    except (OSError, ValueError) as err:
        fail(str(err), EXIT_JOB)
