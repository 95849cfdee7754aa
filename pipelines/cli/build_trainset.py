"""`ugcsr build-trainset SRC DST`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from .common import EXIT_ITEMS_FAILED, check_dst, echo_result, given, load_config, ray_log_dir, run_command

PRESETS = Literal["paper", "realesrgan", "ugc"]  # srmodel.degrade.PRESETS, spelled out so --help needs no torch
OPTION_OF = {("src",): "src", ("dst",): "dst", ("pairs",): "pairs", ("preset",): "preset", ("seed",): "seed",
             ("crop",): "crop", ("address",): "address", ("limit",): "limit", ("shards",): "shards",
             ("storage", "endpoint_url"): "endpoint_url"}  # job field -> the parameter that sets it


def build_trainset(
    src: str = typer.Argument(..., metavar="SRC", help="HR images: folder or s3://bucket/prefix (LSDIR layout or any tree)"),
    dst: str = typer.Argument(..., metavar="DST", help="where the Parquet shards, _manifest/ and dataset_card.json go"),
    pairs: Optional[str] = typer.Option(None, help="official paired set: a folder with hr/ and lr/ (same names)"),
    preset: Optional[PRESETS] = typer.Option(
        None, help="degradation preset [default: paper]"),
    seed: Optional[int] = typer.Option(None, help="the same seed gives byte-identical pairs on any cluster size [default: 0]"),
    crop: Optional[int] = typer.Option(None, help="GT crop size in pixels (>= 16); the LR crop is crop / 4 (the "
                                                          "presets' scale) [default: 512]"),
    shards: Optional[int] = typer.Option(None, help="hash buckets the crops are spread over [default: 256]"),
    config: Optional[Path] = typer.Option(None, help="job YAML (examples/build-trainset.yaml); options given here "
                                                     "override it"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
    limit: Optional[int] = typer.Option(None, help="at most N (>= 1) crops this run (a later full run completes the rest)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the crops and shards a run would build; build nothing"),
    print_config: bool = typer.Option(False, "--print-config", help="print the effective job as YAML and exit"),
    fail_on_error: bool = typer.Option(False, "--fail-on-error", help=f"exit {EXIT_ITEMS_FAILED} if any crop failed"),
    log_interval: float = typer.Option(30.0, min=1, help="without a terminal: seconds between progress lines"),
) -> None:
    """Build the degraded training mix as Parquet shards (gt_png, lr_png, prompt, source, degradation, seed).

    Tiny trials: the paper preset draws its degradation branch once per group
    of 10 crops, so a few images may all land on the clean (bicubic-only)
    branch; the summary's by_branch counts show it. Use --preset realesrgan to
    see degradations on a handful of images.

    Exit codes: 0 done, 1 some crop failed and --fail-on-error was given, 2 bad
    option or setting, 3 the job could not run (SRC missing, DST unusable or
    built with other settings).
    """
    options = dict(locals())
    check_dst(dst)
    data = load_config(config)
    from pipelines.build_trainset import TrainsetJob, plan

    data.update(given(src=src, dst=dst, pairs=pairs, preset=preset, seed=seed, crop=crop, shards=shards,
                      address=address, limit=limit))
    run_command(TrainsetJob, data, option_of=OPTION_OF, options=options, config=config, endpoint_url=endpoint_url,
                print_config=print_config, dry_run=dry_run, plan=plan, run=lambda job: _run(job, log_interval),
                failures=lambda summary: summary["processed"].get("error", 0), fail_on_error=fail_on_error)


def _run(job, log_interval: float) -> dict:
    from pipelines.cli.progress import Progress

    from .common import err_console, quiet_ray

    with Progress("crops", interval_s=log_interval) as progress:
        progress.starting("loading libraries (torch, Ray)")
        quiet_ray()
        from pipelines.build_trainset import run_build_trainset

        progress.starting("listing SRC")

        def on_plan(crops: int, shards: int) -> None:
            progress.start(crops)
            progress.starting(f"building {shards} shard(s) of {crops} crop(s)" if shards else "all shards are built")

        def on_shard(batch) -> None:
            ok = int(sum(batch["ok"])) + int(sum(batch["skipped"]))
            progress.advance(ok, int(sum(batch["error"])))

        summary = run_build_trainset(job, on_plan=on_plan, on_shard=on_shard)
    echo_result({**summary, "ray_logs": ray_log_dir()})
    console = err_console()
    if summary.get("note"):
        console.print(f"[yellow]note:[/yellow] {summary['note']}", soft_wrap=True)
    if summary["processed"].get("error"):
        console.print(f"[yellow]{summary['processed']['error']} crop(s) failed: see {job.dst.rstrip('/')}/_manifest; "
                      "a re-run retries their shards[/yellow]")
    return summary
