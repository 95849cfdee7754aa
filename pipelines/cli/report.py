"""`ugcsr report DST`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import EXIT_JOB, EXIT_USAGE, echo_result, fail


def report(
    run_dir: str = typer.Argument(..., metavar="DST", help="an upscale DST (local or s3://) or a training run folder"),
    out: Path = typer.Option(Path("report.html"), help="the HTML page; its assets go to a folder beside it"),
    eval_dir: Optional[str] = typer.Option(None, "--eval", help="an evaluate output (default: DST/_eval when present)"),
    gallery: int = typer.Option(24, min=0, help="images in the gallery sample (plus the worst by PSNR when evaluated)"),
    per_page: int = typer.Option(8, min=1, help="gallery items per page"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
) -> None:
    """A static, self-contained HTML report of a run: settings, counts, plots, errors, a gallery, metrics.

    The page's folder (<out>_files/) is replaced only when an earlier report wrote it (it holds a
    .ugcsr-report-assets marker); --out must lie outside the run's input and output folders. The gallery
    reads only images under the run's input or output folder (an input list file: its folder); other rows
    are listed without a picture.

    Exit codes: 0 done, 2 bad option (an --out that would harm something), 3 the run could not be read.
    """
    from cluster.storage import StorageConfig
    from pipelines.report import build_report
    from pipelines.report.render import ReportOutError

    try:
        info = build_report(run_dir, out, storage=StorageConfig(endpoint_url=endpoint_url), eval_dir=eval_dir,
                            gallery=gallery, per_page=per_page)
    except ReportOutError as err:  # before the ValueError below: it is the option's fault, not the run's
        fail(str(err), EXIT_USAGE)
    except (OSError, ValueError, RuntimeError) as err:
        fail(str(err), EXIT_JOB)
    echo_result(info)
