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


def with_seesr(model: dict, seesr: Path) -> dict:
    """The model with unet/ and controlnet/ from `seesr` (the other parts as the preset or --weights give them)."""
    from srmodel.loader import resolve
    from srmodel.presets import get_preset

    for sub in ("unet", "controlnet"):
        if not (seesr / sub / "config.json").is_file():
            raise typer.BadParameter(f"--seesr {seesr} has no {sub}/config.json; expected a folder with unet/ and "
                                     "controlnet/ as released (or RUN/export/checkpoint-N)")
    if model.get("source") is None and model["name"] != "tiny":
        raise typer.BadParameter(f"--seesr replaces unet/ and controlnet/ only: preset {model['name']!r} also needs "
                                 "--weights (SD-2-base, SAM2, RAM)")
    if model.get("source") is None:  # tiny: its own folder supplies everything else
        model = resolve(get_preset(model["name"])).model_dump(mode="json")
    folder = str(seesr.resolve())
    # The revision is part of the params hash: outputs of other weights are never taken as done.
    model["source"] = {**model["source"], "seesr": folder, "revision": f"seesr:{folder}"}
    return model


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
    seesr: Optional[Path] = typer.Option(None, help="folder with unet/ and controlnet/ used instead of the preset's or "
                                         "--weights' checkpoint (e.g. RUN/export/checkpoint-N of `ugcsr train`)"),
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
    if seesr is not None:
        model = with_seesr(model, seesr)
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
        started, counts = time.perf_counter(), {"done": 0, "failed": 0}

        def on_rows(rows):
            counts["done"] += len(rows)
            counts["failed"] += sum(r["status"] == "error" for r in rows)
            bar.update(task, completed=counts["done"], failed=counts["failed"],
                       rate=counts["done"] / (time.perf_counter() - started))

        summary = run_upscale(job, on_plan=lambda p: bar.update(task, total=len(p.todo)), on_rows=on_rows)
    print(json.dumps(summary, indent=2))
    if summary["by_status"].get("error"):
        console.print(f"[yellow]{summary['by_status']['error']} image(s) failed: see {dst}/_manifest[/yellow]")


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


@app.command()
def evaluate(
    sr: str = typer.Argument(..., help="SR images: an upscale DST (its manifest is used) or any folder/prefix"),
    gt: str = typer.Argument(..., help="ground truth: folder or s3://bucket/prefix, paired by relative path or stem"),
    out: Optional[str] = typer.Option(None, help="where metrics.parquet and summary.json go (default: SR/_eval)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray"),
    crop_border: int = typer.Option(4, help="pixels cut from each side before PSNR/SSIM (the challenge: 4)"),
    strip: Optional[str] = typer.Option(None, help="regex removed from file stems before pairing, e.g. '_(HR|LR[0-9]|x[0-9])$'"),
    dataset: str = typer.Option("auto", help="published numbers to compare with: auto (from GT's name) | RealSR | DRealSR | none"),
    lpips: bool = typer.Option(True, "--lpips/--no-lpips", help="LPIPS-Alex when its weights are on this machine"),
    no_reference: bool = typer.Option(True, "--nr/--no-nr",
                                      help="MUSIQ/MANIQA/CLIPIQA when the optional pyiqa extra and its weights are present"),
    actors: Optional[int] = typer.Option(None, min=1, help="metric actors (default: half the cluster's CPUs)"),
    gpus_per_actor: float = typer.Option(0.0, help="GPU share per actor (> 0 puts LPIPS/no-reference metrics on GPUs)"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
) -> None:
    """PSNR/SSIM (Y, crop 4), LPIPS and the challenge's no-reference metrics of SR against GT: metrics.parquet + summary.json."""
    from pipelines.evaluate import EvalJob, run_evaluate

    data = dict(sr=sr, gt=gt, out=out, address=address, crop_border=crop_border, strip=strip, dataset=dataset,
                lpips=lpips, no_reference=no_reference,
                resources={"actors": actors, "gpus_per_actor": gpus_per_actor})
    if endpoint_url is not None:
        data["storage"] = {"endpoint_url": endpoint_url}
    try:
        job = EvalJob.model_validate(data)
        summary = run_evaluate(job)
    except ValidationError as err:
        console.print(f"[red]invalid settings:[/red]\n{err}")
        raise typer.Exit(2) from err
    except (OSError, ValueError, RuntimeError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    print(json.dumps(summary, indent=2))
    if summary["counts"]["error"]:
        console.print(f"[yellow]{summary['counts']['error']} GT image(s) without metrics: see {job.out_dir()}/metrics.parquet[/yellow]")


@app.command()
def report(
    run_dir: str = typer.Argument(..., metavar="DST", help="an upscale DST (local or s3://) or a training run folder"),
    out: Path = typer.Option(Path("report.html"), help="the HTML page; its assets go to a folder beside it"),
    eval_dir: Optional[str] = typer.Option(None, "--eval", help="an evaluate output (default: DST/_eval when present)"),
    gallery: int = typer.Option(24, min=0, help="images in the gallery sample (plus the worst by PSNR when evaluated)"),
    per_page: int = typer.Option(8, min=1, help="gallery items per page"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
) -> None:
    """A static, self-contained HTML report of a run: settings, counts, plots, errors, a gallery, metrics."""
    from cluster.storage import StorageConfig
    from pipelines.report import build_report

    try:
        info = build_report(run_dir, out, storage=StorageConfig(endpoint_url=endpoint_url), eval_dir=eval_dir,
                            gallery=gallery, per_page=per_page)
    except (OSError, ValueError, RuntimeError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    print(json.dumps(info, indent=2))


# Training commands live in their own module (imports stay lazy: `ugcsr upscale` never loads them).
from pipelines.train_cli import train as _train, train_export as _train_export  # noqa: E402

app.command("train")(_train)
app.command("train-export")(_train_export)


def run() -> None:  # pragma: no cover - console entry for `python -m pipelines.cli`
    app(prog_name="ugcsr")


if __name__ == "__main__":
    sys.exit(run())
