"""`ugcsr`: the command-line entry point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from srmodel.config import DTYPES, ModelSource
from srmodel.presets import PRESET_NAMES, get_preset

app = typer.Typer(add_completion=False, help="Semantic-guided diffusion super-resolution of UGC images.")
console = Console(stderr=True)


def released_source(weights: Path) -> ModelSource:
    """The README's layout: WEIGHTS/{stable-diffusion-2-base, checkpoint-90000, sam2.1_hiera_tiny.pt}."""
    src = ModelSource(
        sd_base=str(weights / "stable-diffusion-2-base"),
        seesr=str(weights / "checkpoint-90000"),
        sam2_checkpoint=str(weights / "sam2.1_hiera_tiny.pt"),
    )
    for path in (src.sd_base, src.seesr, src.sam2_checkpoint):
        if not Path(path).exists():
            raise typer.BadParameter(f"{path} is missing; --weights must hold the released files (see README)")
    return src


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
    src: Path = typer.Argument(..., help="folder of input images"),
    dst: Path = typer.Argument(..., help="output folder (images + _manifest/)"),
    preset: str = typer.Option("tiny", help=f"one of {', '.join(PRESET_NAMES)}"),
    weights: Optional[Path] = typer.Option(None, help="folder with the released weights (not needed for tiny)"),
    upscale_factor: Optional[int] = typer.Option(None, "--scale", help="override the preset's upscale factor"),
    dtype: Optional[str] = typer.Option(None, help="fp32 | fp16 | bf16 (default: the preset's)"),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if present, else cpu)"),
    fmt: str = typer.Option("png", "--format", help="png | webp | jpeg"),
    batch_size: int = typer.Option(4, min=1),
    limit: Optional[int] = typer.Option(None, min=1, help="process at most N images"),
) -> None:
    """Super-resolve every image under SRC into DST, with a Parquet manifest."""
    from pipelines.local import run_local

    if preset not in PRESET_NAMES:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    source = released_source(weights) if weights else None
    config = get_preset(preset, source)
    updates = {}
    if upscale_factor is not None:
        updates["sampler"] = config.sampler.model_copy(update={"upscale": upscale_factor})
    if dtype is not None:
        updates["dtype"] = dtype
    config = config.model_validate({**config.model_dump(), **{k: v if isinstance(v, str) else v.model_dump() for k, v in updates.items()}})
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console) as bar:
        from pipelines.paths import list_images

        total = len(list_images(src)[:limit])
        task = bar.add_task("upscaling", total=total)
        summary = run_local(src, dst, config, fmt=fmt, batch_size=batch_size, limit=limit, device=device,
                            progress=lambda n: bar.advance(task, n))
    console.print_json(json.dumps(summary))
