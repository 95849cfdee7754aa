"""`ugcsr manifest compact DST`: maintenance of an upscale DST's manifest."""

from __future__ import annotations

from typing import Optional

import typer

from .common import EXIT_JOB, Command, echo_result, fail

app = typer.Typer(help="Maintain DST/_manifest/.", no_args_is_help=True, rich_markup_mode=None)


@app.command("compact", cls=Command)
def compact(
    dst: str = typer.Argument(..., metavar="DST", help="the upscale job's DST (folder or s3://bucket/prefix)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
    rows_per_file: int = typer.Option(500_000, min=1, help="rows per compacted part (at most)"),
) -> None:
    """Merge each run folder's many small parts into few (every row keeps its run; a retried batch's duplicates go).

    Exit codes: 0 done, 2 bad option, 3 the manifest could not be compacted.
    """
    import os

    from cluster import ray_runtime
    from cluster.lease import DstLease
    from cluster.storage import StorageConfig, is_remote
    from pipelines.upscale.manifest import compact as compact_manifest

    from .common import quiet_ray

    storage = StorageConfig(endpoint_url=endpoint_url)
    dst = dst if is_remote(dst) else os.path.abspath(os.path.expanduser(dst.removeprefix("file://")))
    try:
        quiet_ray()
        ray_runtime.connect(address)
        with DstLease(dst, storage):  # never while a run writes parts into DST (they would be folded mid-run)
            info = compact_manifest(dst, storage, rows_per_file=rows_per_file)
    except (OSError, ValueError, RuntimeError) as err:  # LeaseHeld is a RuntimeError
        fail(str(err), EXIT_JOB)
    echo_result(info)
