"""`ugcsr train` and `ugcsr train-export` (registered on the app in pipelines/cli.py; heavy imports inside)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
import yaml
from pydantic import ValidationError


def train(
    trainset: str = typer.Argument(..., metavar="TRAINSET", help="build-trainset output: folder or s3://bucket/prefix with shard-*.parquet"),
    run: str = typer.Argument(..., metavar="RUN", help="run folder or s3:// prefix (checkpoints, export, metrics); re-using it resumes"),
    preset: str = typer.Option("tiny", help="model to start from (and validation sampler): tiny | wild | synthetic"),
    weights: Optional[Path] = typer.Option(None, help="folder with the released weights (not needed for tiny)"),
    init: Optional[str] = typer.Option(None, help="released (the checkpoint as is) | paper (SD-2-base UNet + its image_attentions)"),
    config: Optional[Path] = typer.Option(None, "--config", help="train YAML (TrainJob fields); options override it"),
    workers: Optional[int] = typer.Option(None, min=1, help="training workers (one DDP rank each)"),
    gpus_per_worker: Optional[float] = typer.Option(None, min=0, help="default: 1 if the cluster has GPUs, else 0 (CPU, gloo)"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="per worker per micro-batch (authors: 1)"),
    grad_accum: Optional[int] = typer.Option(None, min=1, help="micro-batches per optimizer step (authors: 2)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (authors: 5e-5, constant)"),
    max_steps: Optional[int] = typer.Option(None, min=1, help="optimizer steps in total"),
    checkpoint_every: Optional[int] = typer.Option(None, min=1, help="optimizer steps between checkpoints"),
    validate_every: Optional[int] = typer.Option(None, min=1, help="steps between validation pictures (multiple of --checkpoint-every)"),
    seed: Optional[int] = typer.Option(None, help="seed of all training randomness"),
    no_shuffle: bool = typer.Option(False, "--no-shuffle", help="read the shards in order, as the authors did"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
) -> None:
    """Fine-tune ControlNet + the semantic cross-attention on TRAINSET with Ray Train; exports to RUN/export/."""
    from pipelines.job import load_yaml

    from .common import err_console, merge
    from .upscale import released_source

    console = err_console()
    from pipelines.train import TrainJob, run_train
    from srmodel.presets import PRESET_NAMES, get_preset

    if preset not in PRESET_NAMES:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    try:
        data = load_yaml(config) if config else {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise typer.BadParameter(f"cannot read --config {config}: {err}") from err
    model = get_preset(preset, released_source(str(weights), preset) if weights else None).model_dump(mode="json")
    data["model"] = merge(model, data.get("model") or {})
    recipe = dict(data.get("recipe") or {})
    recipe.update({k: v for k, v in {"batch_size": batch_size, "grad_accum": grad_accum, "lr": lr, "seed": seed,
                                     "init": init}.items() if v is not None})
    data["recipe"] = recipe
    data.update({k: v for k, v in {"trainset": trainset, "run": run, "workers": workers, "address": address,
                                   "gpus_per_worker": gpus_per_worker, "max_steps": max_steps,
                                   "checkpoint_every": checkpoint_every, "validate_every": validate_every}.items()
                 if v is not None})
    if no_shuffle:
        data["shuffle"] = False
    if endpoint_url is not None:
        data["storage"] = {**(data.get("storage") or {}), "endpoint_url": endpoint_url}
    try:
        job = TrainJob.model_validate(data)
    except ValidationError as err:
        console.print(f"[red]invalid training settings:[/red]\n{err}")
        raise typer.Exit(2) from err
    try:
        summary = run_train(job, log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    except (OSError, ValueError, RuntimeError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    print(json.dumps(summary, indent=2))


def train_export(
    run: str = typer.Argument(..., metavar="RUN", help="a run folder or s3:// prefix of `ugcsr train`"),
    step: Optional[int] = typer.Option(None, help="the checkpoint's step (default: the latest)"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
) -> None:
    """Write RUN/export/checkpoint-<step>/{unet,controlnet} (released layout) from a training checkpoint."""
    from cluster.storage import StorageConfig
    from pipelines.train import export_run

    from .common import err_console

    console = err_console()
    try:
        print(export_run(run, step, StorageConfig(endpoint_url=endpoint_url)))
    except (OSError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
