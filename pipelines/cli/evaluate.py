"""`ugcsr evaluate SR GT`."""

from __future__ import annotations

from typing import Optional

import typer

from .common import EXIT_JOB, echo_result, fail, option_names, settings_error

OPTION_OF = {("sr",): "sr", ("gt",): "gt", ("out",): "out", ("address",): "address", ("crop_border",): "crop_border",
             ("strip",): "strip", ("dataset",): "dataset", ("resources", "actors"): "actors",
             ("resources", "gpus_per_actor"): "gpus_per_actor", ("storage", "endpoint_url"): "endpoint_url"}


def evaluate(
    sr: str = typer.Argument(..., metavar="SR", help="SR images: an upscale DST (its manifest is used) or any folder/prefix"),
    gt: str = typer.Argument(..., metavar="GT", help="ground truth: folder or s3://bucket/prefix, paired by relative path or stem"),
    out: Optional[str] = typer.Option(None, help="where metrics.parquet and summary.json go (default: SR/_eval)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray"),
    crop_border: int = typer.Option(4, help="pixels cut from each side before PSNR/SSIM (the challenge: 4)"),
    strip: Optional[str] = typer.Option(None, help="regex removed from file stems before pairing, e.g. '_(HR|LR[0-9]|x[0-9])$'"),
    dataset: str = typer.Option("auto", help="published numbers to compare with: auto (from GT's name) | RealSR | "
                                             "DRealSR | none"),
    lpips: bool = typer.Option(True, "--lpips/--no-lpips", help="LPIPS-Alex when its weights are on this machine"),
    no_reference: bool = typer.Option(True, "--nr/--no-nr",
                                      help="MUSIQ/MANIQA/CLIPIQA when the optional pyiqa extra and its weights are present"),
    actors: Optional[int] = typer.Option(None, help="metric actors, >= 1 (default: half the cluster's CPUs)"),
    gpus_per_actor: float = typer.Option(0.0, help="GPU share per actor (> 0 puts LPIPS/no-reference metrics on GPUs)"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
) -> None:
    """PSNR/SSIM (Y, crop 4), LPIPS and the challenge's no-reference metrics of SR against GT: metrics.parquet + summary.json.

    Exit codes: 0 done, 2 bad option, 3 the job could not run (SR or GT missing, cluster failure).
    """
    options = dict(locals())
    from pydantic import ValidationError

    from pipelines.evaluate import EvalJob, run_evaluate

    data = dict(sr=sr, gt=gt, out=out, address=address, crop_border=crop_border, strip=strip, dataset=dataset,
                lpips=lpips, no_reference=no_reference,
                resources={"actors": actors, "gpus_per_actor": gpus_per_actor})
    if endpoint_url is not None:
        data["storage"] = {"endpoint_url": endpoint_url}
    try:
        job = EvalJob.model_validate(data)
    except ValidationError as err:
        settings_error(err, option_names(OPTION_OF, options), None)
    try:
        summary = run_evaluate(job)
    except (OSError, ValueError, RuntimeError) as err:
        fail(str(err), EXIT_JOB)
    echo_result(summary)
    if summary["counts"]["error"]:
        from .common import err_console

        err_console().print(f"[yellow]{summary['counts']['error']} GT image(s) without metrics: see "
                            f"{job.out_dir()}/metrics.parquet[/yellow]", soft_wrap=True)
