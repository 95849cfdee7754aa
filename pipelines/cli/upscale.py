"""`ugcsr upscale SRC DST`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from .common import EXIT_ITEMS_FAILED, check_dst, echo_result, given, load_config, merge, ray_log_dir, run_command

# Spelled out here so that --help needs no torch; tests/pipelines/test_cli_ux.py checks them against srmodel.
PRESETS = Literal["wild", "synthetic", "tiny"]
DTYPES = Literal["fp32", "fp16", "bf16"]

# Which parameter sets which job field: errors in a value given on the command line name the option.
OPTION_OF = {
    ("src",): "src", ("dst",): "dst", ("address",): "address", ("limit",): "limit", ("format",): "fmt",
    ("relist",): "relist", ("allow_src",): "allow_src", ("cache_semantic",): "cache_semantic", ("storage", "endpoint_url"): "endpoint_url",
    ("model", "sampler", "upscale"): "scale", ("model", "dtype"): "dtype", ("model", "geometry"): "geometry",
    ("model", "sampler", "prompt_source"): "prompt_source", ("model", "sampler", "fixed_tags"): "tags",
    ("model", "sampler", "user_prompt"): "prompt",
}


def released_source(weights: str, preset: str = "wild", storage=None):
    """The README's layout under a folder or s3:// prefix: stable-diffusion-2-base/, checkpoint-90000/, SAM2,
    RAM, DAPE; for `tiny` the layout `python -m srmodel.tiny DIR` writes."""
    from cluster.storage import filesystem, join
    from srmodel.config import ModelSource
    from srmodel.tiny import released_tiny_source

    weights = weights.rstrip("/") if "://" in weights else str(Path(weights).expanduser().absolute())
    if preset == "tiny":
        src = released_tiny_source(weights)
    else:
        src = ModelSource(sd_base=join(weights, "stable-diffusion-2-base"), seesr=join(weights, "checkpoint-90000"),
                          sam2_checkpoint=join(weights, "sam2.1_hiera_tiny.pt"))
    fs, _ = filesystem(weights, storage)

    def exists(uri: str) -> bool:
        return fs.exists(filesystem(uri, storage)[1])

    if preset != "tiny":  # the tagger files are optional (--prompt-source fixed needs none)
        ram, dape = join(weights, "ram_swin_large_14m.pth"), join(weights, "DAPE.pth")
        src = src.model_copy(update={"ram": ram if exists(ram) else None, "dape": dape if exists(dape) else None})
    for path in (src.sd_base, src.seesr, src.sam2_checkpoint):
        if not exists(path):
            raise typer.BadParameter(f"{path} is missing; WEIGHTS must hold the released files (see README)",
                                     param_hint="'--weights'")
    return src


def pinned(source, weights: str | None, sums: Path):
    """`source` with {file URI: sha256} from a sha256sum list of the WEIGHTS folder."""
    from cluster.storage import is_remote, join
    from cluster.weights import read_sha256_list

    if source is None or not is_remote(weights):
        raise typer.BadParameter("pins check weights staged from object storage: give --weights s3://...",
                                 param_hint="'--weights-sha256'")
    try:
        pins = read_sha256_list(sums.read_text())
        return source.model_copy(update={"sha256": {join(weights.rstrip("/"), rel): d for rel, d in pins.items()}})
    except (OSError, ValueError) as err:
        raise typer.BadParameter(f"{sums}: {err}", param_hint="'--weights-sha256'") from err


def _storage(data: dict, endpoint_url: str | None):
    from cluster.storage import StorageConfig

    storage = dict(data.get("storage") or {})
    if endpoint_url is not None:
        storage["endpoint_url"] = endpoint_url
    try:
        return StorageConfig.model_validate(storage)
    except Exception as err:  # noqa: BLE001 - pydantic's error, shown as a usage error
        raise typer.BadParameter(f"invalid storage settings: {err}", param_hint="'--config'") from err


def with_seesr(model: dict, seesr: str, storage=None) -> dict:
    """The model with unet/ and controlnet/ from `seesr`, a folder or URI (the other parts as the preset or
    --weights give them)."""
    from cluster.storage import filesystem, join
    from srmodel.stages import resolve
    from srmodel.presets import get_preset

    for sub in ("unet", "controlnet"):
        fs, path = filesystem(join(seesr, sub, "config.json"), storage)
        if not fs.isfile(path):
            raise typer.BadParameter(f"{seesr} has no {sub}/config.json; expected a folder with unet/ and "
                                     "controlnet/ as released (or RUN/export/checkpoint-N)", param_hint="'--seesr'")
    if model.get("source") is None and model["name"] != "tiny":
        raise typer.BadParameter(f"--seesr replaces unet/ and controlnet/ only: preset {model['name']!r} also needs "
                                 "--weights (SD-2-base, SAM2, RAM)", param_hint="'--seesr'")
    if model.get("source") is None:  # tiny: its own folder supplies everything else
        model = resolve(get_preset(model["name"])).model_dump(mode="json")
    folder = seesr.rstrip("/") if "://" in seesr else str(Path(seesr).expanduser().resolve())
    # The revision is part of the params hash: outputs of other weights are never taken as done.
    model["source"] = {**model["source"], "seesr": folder, "revision": f"seesr:{folder}"}
    return model


def upscale(
    src: str = typer.Argument(..., metavar="SRC",
                              help="folder, s3://bucket/prefix (any fsspec URL), or a .parquet/.txt list of URIs"),
    dst: str = typer.Argument(..., metavar="DST", help="output folder or prefix (images + _manifest/)"),
    preset: Optional[PRESETS] = typer.Option(
        None, help="wild (x1, CFG 8.5) | synthetic (x4) need --weights; tiny (random weights, for trials) is the "
                   "default without --weights"),
    weights: Optional[str] = typer.Option(
        None, help="folder or s3:// prefix with the released weights (README); needs --preset"),
    weights_sha256: Optional[Path] = typer.Option(
        None, "--weights-sha256", help="sha256sum output of WEIGHTS (paths relative to it): every file staged from "
                                       "object storage must match (docs/cluster.md)"),
    allow_cpu: bool = typer.Option(False, "--allow-cpu", help="run a full-size preset on a cluster without GPUs"),
    shared_fs: bool = typer.Option(False, "--shared-fs", help="local SRC/DST are on a filesystem every node mounts"),
    seesr: Optional[str] = typer.Option(None, help="folder or s3:// prefix with unet/ and controlnet/ used instead of the preset's or "
                                         "--weights' checkpoint (e.g. RUN/export/checkpoint-N of `ugcsr train`)"),
    geometry: Optional[Literal["release", "exact-size"]] = typer.Option(
        None, help="image path around the model: release (the authors' resizes and rounding, default) | exact-size "
                   "(exact aspect, pad and crop); see docs/model.md"),
    config: Optional[Path] = typer.Option(None, help="job YAML (examples/upscale.yaml); options given here override it"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray"),
    scale: Optional[int] = typer.Option(None, help="upscale factor, 1-16 (default: the preset's)"),
    dtype: Optional[DTYPES] = typer.Option(None, help="default: the preset's"),
    fmt: Optional[Literal["png", "webp", "jpeg"]] = typer.Option(None, "--format", help="output format [default: png]"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)"),
    limit: Optional[int] = typer.Option(None, help="process at most N (>= 1) images this run"),
    allow_src: Optional[list[str]] = typer.Option(
        None, "--allow-src", help="a URI prefix the rows of a .txt/.parquet SRC list may name besides the list's own "
                                  "bucket or folder (repeatable; docs/cluster.md)"),
    relist: Optional[bool] = typer.Option(
        None, "--relist/--no-relist",
        help="list SRC again / reuse the listing under DST/_state/ [default: relist local folders, reuse remote listings]"),
    cache_semantic: Optional[str] = typer.Option(None, help="URI to keep SAM2 tokens per image for later runs"),
    prompt_source: Optional[Literal["tagger", "fixed"]] = typer.Option(
        None, help="tagger: RAM+DAPE tags per image; fixed: --tags for all"),
    tags: Optional[str] = typer.Option(None, help="the tags used with --prompt-source fixed"),
    prompt: Optional[str] = typer.Option(None, help="user text inserted after the tags, as released"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print what would run and the pools; load no model"),
    print_config: bool = typer.Option(False, "--print-config", help="print the effective job as YAML and exit"),
    fail_on_error: bool = typer.Option(False, "--fail-on-error", help=f"exit {EXIT_ITEMS_FAILED} if any image failed"),
    log_interval: float = typer.Option(30.0, min=1, help="without a terminal: seconds between progress lines"),
) -> None:
    """Super-resolve every image under SRC into DST, with a Parquet manifest; re-running resumes.

    Exit codes: 0 done (failed images have error rows in the manifest), 1 some image failed and
    --fail-on-error was given, 2 bad option or setting, 3 the job could not run (SRC missing or
    empty, DST unusable, weights missing, cluster failure).
    """
    options = dict(locals())
    if weights is not None and preset is None:
        raise typer.BadParameter("--weights needs --preset wild (x1, CFG 8.5) or --preset synthetic (x4); "
                                 "tiny is the random-weights test model", param_hint="'--preset'")
    check_dst(dst)
    data = load_config(config)
    from pipelines.upscale.job import UpscaleJob
    from pipelines.upscale.run import dry_run as plan_only
    from srmodel.presets import get_preset

    source = released_source(weights, preset or "tiny", _storage(data, endpoint_url)) if weights else None
    if weights_sha256 is not None:
        source = pinned(source, weights, weights_sha256)
    model = get_preset(preset or "tiny", source).model_dump(mode="json")
    if seesr is not None:
        model = with_seesr(model, seesr, _storage(data, endpoint_url))
    sampler = given(upscale=scale, prompt_source=prompt_source, fixed_tags=tags, user_prompt=prompt)
    data["model"] = merge(merge(model, data.get("model") or {}), given(dtype=dtype, geometry=geometry, sampler=sampler or None))
    data.update(given(src=src, dst=dst, address=address, limit=limit, format=fmt, cache_semantic=cache_semantic,
                      relist=relist, allow_src=allow_src or None, allow_cpu=allow_cpu or None, shared_fs=shared_fs or None))
    run_command(UpscaleJob, data, option_of=OPTION_OF, options=options, config=config, endpoint_url=endpoint_url,
                print_config=print_config, dry_run=dry_run, plan=plan_only, run=lambda job: _run(job, log_interval),
                failures=lambda summary: summary["by_status"].get("error", 0), fail_on_error=fail_on_error)


def _run(job, log_interval: float) -> dict:
    from pipelines.cli.progress import Progress

    from .common import err_console, quiet_libraries, quiet_ray

    console = err_console()
    with Progress("images", interval_s=log_interval) as progress:
        progress.starting("loading libraries (torch, Ray)")
        quiet_libraries()
        quiet_ray()
        from pipelines.upscale.run import run_upscale

        progress.starting("checking the model, listing SRC, starting Ray")

        def on_plan(plan):
            progress.note(f"{listing_note(job, plan)}; {plan.to_process} to process, {plan.skipped} already done")
            progress.start(plan.to_process)
            p = plan.pools
            if plan.to_process:
                # Ray Data reports nothing before the first batch leaves the pipeline: this phase ends there.
                actors = (f"{p['sr_actors']} SR actor(s) (SAM2 and the tagger inside)" if p.get("layout") == "fused"
                          else f"{p['sr_actors']} SR + {p['semantic_actors']} semantic actor(s)")
                progress.starting(f"starting {actors}, loading models, first batch")

        seen = [0, 0]  # done, errors already shown: the driver reports running totals

        def on_progress(done, errors, total):
            progress.advance((done - errors) - (seen[0] - seen[1]), errors - seen[1])
            seen[:] = [done, errors]

        summary = run_upscale(job, on_plan=on_plan, on_progress=on_progress)
    logs = ray_log_dir()
    summary_out = {**summary, "ray_logs": logs} if logs else summary
    echo_result(summary_out)
    failed = summary["by_status"].get("error", 0)
    where = summary.get("manifest") or f"{job.dst.rstrip('/')}/_manifest"
    if failed:
        console.print(f"[yellow]{failed} image(s) failed: their rows in {where} say why[/yellow]")
    console.print(f"done: {summary['processed']} processed in {summary['wall_s']:.1f} s; manifest {where}"
                  + (f"; Ray logs {logs}" if logs else ""), soft_wrap=True)
    return summary


def listing_note(job, plan) -> str:
    """How SRC was listed; a reused listing says when it was made and how to list again."""
    count = plan.total
    if not plan.listing_cached:
        return f"SRC listed: {count} image(s)"
    made = plan.listed_at or "an earlier run"
    return (f"reusing the listing of SRC made {made} ({count} image(s)); files added since are not seen: "
            "add --relist to list SRC again")

