"""`ugcsr`: the command-line entry point."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from srmodel.config import DTYPES, ModelSource
from srmodel.presets import PRESET_NAMES, get_preset

app = typer.Typer(add_completion=False, help="Semantic-guided diffusion super-resolution of UGC images on Ray.")
console = Console(stderr=True)


def released_source(weights: Path) -> ModelSource:
    """The README's layout: WEIGHTS/{stable-diffusion-2-base, checkpoint-90000, sam2.1_hiera_tiny.pt}."""
    ram, dape = weights / "ram_swin_large_14m.pth", weights / "DAPE.pth"
    src = ModelSource(
        sd_base=str(weights / "stable-diffusion-2-base"),
        seesr=str(weights / "checkpoint-90000"),
        sam2_checkpoint=str(weights / "sam2.1_hiera_tiny.pt"),
        ram=str(ram) if ram.exists() else None,
        dape=str(dape) if dape.exists() else None,
    )
    for path in (src.sd_base, src.seesr, src.sam2_checkpoint):
        if not Path(path).exists():
            raise typer.BadParameter(f"{path} is missing; --weights must hold the released files (see README)")
    return src


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@app.callback()
def main() -> None:
    """ugcsr command line."""
    # Library chatter (loading bars, the optional-accelerate notice) drowns the job's own progress.
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command()
def upscale(
    src: str = typer.Argument(..., help="folder, s3://bucket/prefix (any fsspec URL), or a .parquet/.txt list of URIs"),
    dst: str = typer.Argument(..., help="output folder or prefix (images + _manifest/)"),
    preset: str = typer.Option("tiny", help=f"one of {', '.join(PRESET_NAMES)}"),
    weights: Optional[Path] = typer.Option(None, help="folder with the released weights (not needed for tiny)"),
    config: Optional[Path] = typer.Option(None, "--config", help="job YAML (UpscaleJob fields); options override it"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray"),
    scale: Optional[int] = typer.Option(None, help="override the preset's upscale factor"),
    dtype: Optional[str] = typer.Option(None, help="fp32 | fp16 | bf16 (default: the preset's)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="png | webp | jpeg"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
    limit: Optional[int] = typer.Option(None, min=1, help="process at most N images this run"),
    relist: bool = typer.Option(False, "--relist", help="list SRC again instead of reusing the cached listing"),
    cache_semantic: Optional[str] = typer.Option(None, help="URI to keep SAM2 tokens per image for later runs"),
    prompt_source: Optional[str] = typer.Option(None, help="tagger (RAM+DAPE tags per image) | fixed (--tags for all)"),
    tags: Optional[str] = typer.Option(None, help="the tags used with --prompt-source fixed"),
    prompt: Optional[str] = typer.Option(None, help="user text inserted after the tags, as released"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would run and the resources, load no model"),
) -> None:
    """Super-resolve every image under SRC into DST, with a Parquet manifest; re-running resumes."""
    from pipelines.job import UpscaleJob, load_yaml
    from pipelines.upscale import dry_run as plan_only

    if preset not in PRESET_NAMES:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        data = load_yaml(config) if config else {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise typer.BadParameter(f"cannot read --config {config}: {err}") from err
    model = get_preset(preset, released_source(weights) if weights else None).model_dump(mode="json")
    data["model"] = _merge(model, data.get("model") or {})
    overrides = {"src": src, "dst": dst, "address": address, "limit": limit, "format": fmt,
                 "cache_semantic": cache_semantic, "relist": relist or None}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if scale is not None:
        data["model"]["sampler"]["upscale"] = scale
    if dtype is not None:
        data["model"]["dtype"] = dtype
    if prompt_source is not None:
        if prompt_source not in ("tagger", "fixed"):
            raise typer.BadParameter(f"--prompt-source must be tagger or fixed, not {prompt_source!r}")
        data["model"]["sampler"]["prompt_source"] = prompt_source
    if tags is not None:
        data["model"]["sampler"]["fixed_tags"] = tags
    if prompt is not None:
        data["model"]["sampler"]["user_prompt"] = prompt
    if endpoint_url is not None:
        data["storage"] = {**(data.get("storage") or {}), "endpoint_url": endpoint_url}
    try:
        job = UpscaleJob.model_validate(data)
    except ValidationError as err:
        console.print(f"[red]invalid job settings:[/red]\n{err}")
        raise typer.Exit(2) from err

    try:
        if dry_run:
            print(json.dumps(plan_only(job), indent=2))
            return
        _run(job, dst)
    except (OSError, ValueError, RuntimeError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err


def _run(job, dst: str) -> None:
    from pipelines.upscale import run_upscale

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[failed]} failed, {task.fields[rate]:.2f} img/s"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("upscaling", total=None, failed=0, rate=0.0)
        started = time.perf_counter()

        def on_progress(done, errors, total):
            bar.update(task, completed=done, failed=errors, rate=done / (time.perf_counter() - started))

        summary = run_upscale(job, on_plan=lambda p: bar.update(task, total=p.to_process), on_progress=on_progress)
    print(json.dumps(summary, indent=2))
    if summary["by_status"].get("error"):
        console.print(f"[yellow]{summary['by_status']['error']} image(s) failed: see {summary['manifest']}[/yellow]")


@app.command("build-trainset")
def build_trainset(
    src: str = typer.Argument(..., help="HR images: folder or s3://bucket/prefix (LSDIR layout or any tree)"),
    dst: str = typer.Argument(..., help="where the Parquet shards, _manifest/ and dataset_card.json go"),
    pairs: Optional[str] = typer.Option(None, help="official paired set: a folder with hr/ and lr/ (same names)"),
    preset: str = typer.Option("paper", help="degradation preset: paper | realesrgan | ugc"),
    seed: int = typer.Option(0, help="the same seed gives byte-identical pairs on any cluster size"),
    crop: int = typer.Option(512, help="GT crop size (LR is crop / scale)"),
    config: Optional[Path] = typer.Option(None, "--config", help="job YAML (TrainsetJob fields)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
    limit: Optional[int] = typer.Option(None, min=1, help="at most N crops"),
) -> None:
    """Build the degraded training mix as Parquet shards (gt_png, lr_png, prompt, source, degradation, seed)."""
    from pipelines.build_trainset import TrainsetJob, run_build_trainset
    from pipelines.job import load_yaml

    try:
        data = load_yaml(config) if config else {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise typer.BadParameter(f"cannot read --config {config}: {err}") from err
    data.update({k: v for k, v in {"src": src, "dst": dst, "pairs": pairs, "preset": preset, "seed": seed,
                                   "crop": crop, "address": address, "limit": limit}.items() if v is not None})
    if endpoint_url is not None:
        data["storage"] = {**(data.get("storage") or {}), "endpoint_url": endpoint_url}
    try:
        job = TrainsetJob.model_validate(data)
        summary = run_build_trainset(job)
    except ValidationError as err:
        console.print(f"[red]invalid settings:[/red]\n{err}")
        raise typer.Exit(2) from err
    except (OSError, ValueError, RuntimeError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    print(json.dumps(summary, indent=2))


manifest_app = typer.Typer(help="Maintain DST/_manifest/.")
app.add_typer(manifest_app, name="manifest")


@manifest_app.command("compact")
def manifest_compact(
    dst: str = typer.Argument(..., help="the upscale job's DST (folder or s3://bucket/prefix)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
    rows_per_file: int = typer.Option(500_000, min=1, help="rows per compacted part"),
) -> None:
    """Rewrite the manifest's many small parts into few, keeping the latest row per image and settings."""
    import os

    from cluster import ray_runtime
    from cluster.storage import StorageConfig, is_remote
    from pipelines.manifest import compact

    storage = StorageConfig(endpoint_url=endpoint_url)
    dst = dst if is_remote(dst) else os.path.abspath(os.path.expanduser(dst.removeprefix("file://")))
    try:
        ray_runtime.connect(address)
        print(json.dumps(compact(dst, storage, rows_per_file=rows_per_file), indent=2))
    except (OSError, ValueError, RuntimeError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err


def run() -> None:  # pragma: no cover - console entry for `python -m pipelines.cli`
    app(prog_name="ugcsr")


if __name__ == "__main__":
    sys.exit(run())
