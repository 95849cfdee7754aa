"""What every command shares: exit codes, the --config rule, error messages in the CLI's words."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NoReturn

import typer
import typer.core

# Exit codes (documented in README "Exit codes"):
EXIT_OK = 0  # finished; images that failed have error rows (unless --fail-on-error)
EXIT_ITEMS_FAILED = 1  # --fail-on-error and at least one image/crop failed
EXIT_USAGE = 2  # bad option or setting (click's own code for usage errors)
EXIT_JOB = 3  # the job could not run: SRC missing or empty, DST unusable, weights missing, cluster failure


class Command(typer.core.TyperCommand):
    """Usage line as `ugcsr upscale [OPTIONS] SRC DST` (typer writes required arguments as `{SRC}`)."""

    def collect_usage_pieces(self, ctx):
        import re

        # `{SRC}` -> `SRC`; a variadic `{-- PROGRAM ARGS...}...` -> `-- PROGRAM ARGS...`
        return [re.sub(r"^\{(.*)\}(\.\.\.)?$", r"\1", p) for p in super().collect_usage_pieces(ctx)]


_results = None  # the stream a command's result goes to: stdout as it was when the command started


def keep_stdout_for_results(ctx: typer.Context) -> None:
    """For the rest of the command sys.stdout is stderr; `echo_result` writes to the real stdout.

    Ray's driver prints cluster warnings ("(raylet) WARNING: 8 PYTHON worker processes have been
    started ...", a worker killed for memory) to sys.stdout from a background thread, at any moment
    while it is connected. stdout carries the command's result for `jq`, so those lines join the
    progress lines on stderr. The old stdout comes back when the command ends (in-process callers).
    """
    import sys

    global _results
    _results, before = sys.stdout, sys.stdout
    sys.stdout = sys.stderr

    def restore() -> None:
        global _results
        sys.stdout, _results = before, None

    ctx.call_on_close(restore)


def results_stream():
    """Where a command's results go (stdout as it was when the command started), for streamed output."""
    import sys

    return _results or sys.stdout


def echo_result(result: Any, *, nl: bool = True) -> None:
    """The command's result on stdout: JSON for a dict or list, a string as it is."""
    import json

    text = result if isinstance(result, str) else json.dumps(result, indent=2)
    typer.echo(text, file=results_stream(), nl=nl)


def err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def fail(message: str, code: int = EXIT_JOB) -> NoReturn:
    err_console().print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def load_config(path: Path | None) -> dict:
    """The --config YAML as a dict ({} without one); a bad file is a usage error naming it."""
    if path is None:
        return {}
    import yaml

    from pipelines.upscale.job import load_yaml

    try:
        return load_yaml(path)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise typer.BadParameter(f"cannot read {path}: {err}", param_hint="'--config'") from err


def merge(base: dict, override: dict) -> dict:
    """`override` wins key by key, recursively for nested mappings."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def given(**options: Any) -> dict:
    """The options the user gave: typer defaults are None, so a --config value applies unless the option is given."""
    return {k: v for k, v in options.items() if v is not None}


def check_dst(dst: str) -> None:
    """A local DST must be a folder or not exist yet (it is created); say so before any work starts."""
    if "://" in dst and not dst.startswith("file://"):
        return
    path = Path(dst.removeprefix("file://")).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"is under {p}, which is a file"
                raise typer.BadParameter(f"{dst} {what}; DST must be a folder (created if missing) or an s3:// prefix",
                                         param_hint="'DST'")
            if not os.access(p, os.W_OK):
                raise typer.BadParameter(f"{dst}: {p} is not writable", param_hint="'DST'")
            return


def settings_error(err, options: dict[tuple, str], config: Path | None) -> NoReturn:
    """A pydantic ValidationError in the CLI's words: which option (or --config key), what was given, what is allowed."""
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        name = options.get(loc)
        dotted = ".".join(map(str, loc)) or "settings"
        if name is None:
            name = f"{dotted} (in --config {config})" if config else dotted
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{name}: unknown setting (check its spelling; `--print-config` lists the known ones)")
        elif e["type"] == "missing":
            lines.append(f"{name}: required")
        else:
            given = e.get("input")
            if isinstance(given, str):  # a URI's user:password@ is never printed
                from cluster.storage import redact

                given = redact(given)
            lines.append(f"{name}: {msg}; given: {given!r}")
    fail("invalid settings:\n  " + "\n  ".join(lines), EXIT_USAGE)


def run_command(job_cls, data: dict, *, option_of: dict, options: dict, config: Path | None, endpoint_url: str | None,
                print_config: bool, dry_run: bool, plan, run, failures, fail_on_error: bool) -> None:
    """What every job command does once its options are merged into `data`: validate, then
    --print-config, --dry-run (`plan(job)`) or `run(job)`, and the exit code (`failures(summary)`)."""

    from pydantic import ValidationError

    if endpoint_url is not None:
        data["storage"] = {**(data.get("storage") or {}), "endpoint_url": endpoint_url}
    try:
        job = job_cls.model_validate(data)
    except ValidationError as err:
        settings_error(err, option_names(option_of, options), config)
    if print_config:
        print_yaml(job.model_dump(mode="json"))
        return
    try:
        if dry_run:
            echo_result(plan(job))
            return
        summary = run(job)
    except (OSError, ValueError, RuntimeError) as err:
        fail(str(err), EXIT_JOB)
    if fail_on_error and failures(summary):
        raise typer.Exit(EXIT_ITEMS_FAILED)


def option_names(option_of: dict, options: dict) -> dict:
    """{job field: how the user wrote it} for the fields set on the command line (SRC, DST, --scale, ...)."""
    names = {}
    for loc, param in option_of.items():
        if options.get(param) is not None:
            names[loc] = param.upper() if param in ("src", "dst") else "--" + {"fmt": "format"}.get(param, param).replace("_", "-")
    return names


def print_yaml(data: dict) -> None:
    import yaml

    echo_result(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())


def quiet_libraries() -> None:
    """Library chatter (loading bars, the optional-accelerate notice) drowns the job's own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def quiet_ray() -> None:
    """Keep Ray Data's INFO/WARNING lines (execution plan, "Progress bars disabled") off the terminal.

    They still go to ray-data.log in the session's log folder, which the summary names.
    """
    import ray._private.log
    import ray.data  # noqa: F401 - configures Ray Data's logging; adjusted below

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, ray._private.log.PlainRayHandler):  # noqa: SLF001 - Ray Data's console handler
            handler.setLevel(logging.ERROR)


def ray_log_dir() -> str | None:
    """Where Ray wrote this session's logs (kept off the terminal)."""
    try:
        import ray

        node = getattr(ray._private.worker, "_global_node", None)  # noqa: SLF001 - no public accessor in Ray 2.60
        return os.path.join(node.get_session_dir_path(), "logs") if node is not None else None
    except Exception:  # noqa: BLE001 - only informative
        return None
