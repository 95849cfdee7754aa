"""`ugcsr submit` and `ugcsr jobs ...`: ugcsr programs as Ray jobs (cluster/jobs.py does the work).

Registered on the main app by `register(app)`; Ray's job client is imported inside the commands so
`ugcsr --help` stays fast.
"""

from __future__ import annotations

import shutil
from typing import List, Optional

import typer
from rich.console import Console

from pipelines.cli.common import Command, echo_result, results_stream

try:  # typer >= 0.2x vendors its own click: its usage errors are that module's
    from typer._click import ClickException
except ImportError:  # pragma: no cover - older typer on plain click
    from click import ClickException

console = Console(stderr=True, soft_wrap=True)  # whole lines: they end up in job logs
PROGRAMS = ("upscale", "build-trainset", "train")


def _fail(msg: str, code: int = 2):
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(code)


def submit(
    ctx: typer.Context,
    command: List[str] = typer.Argument(..., metavar="-- PROGRAM ARGS...", help="e.g. -- upscale s3://in s3://out --preset wild"),
    address: Optional[str] = typer.Option(None, help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow the job's log to the end; exit with its result"),
    env: List[str] = typer.Option([], "--env", help="NAME=VALUE passed to the job (no secrets: refused)"),
    ship_code: bool = typer.Option(True, "--ship-code/--no-ship-code",
                                   help="upload this checkout's code (py_modules) instead of using the image's"),
) -> None:
    """Run an ugcsr program as a Ray job; submitting the same job twice attaches to the running one."""
    from cluster import jobs

    program, args = command[0], list(command[1:])
    root = ctx.find_root().command
    if program not in PROGRAMS or program not in getattr(root, "commands", {}):
        _fail(f"cannot submit {program!r}; choose one of "
              f"{', '.join(p for p in PROGRAMS if p in getattr(root, 'commands', {}))}")
    try:  # the program's own option parser: a typo fails here, not on the cluster minutes later
        sub = root.commands[program].make_context(program, list(args), parent=ctx)
    except ClickException as err:
        _fail(f"{program}: {err.format_message()}")
    try:
        extra = dict(e.split("=", 1) for e in env)
    except ValueError:
        _fail("--env takes NAME=VALUE")
    try:
        job_env = jobs.storage_env(extra)
        for arg in args:  # the entrypoint is recorded in the job table: no credentials in it
            jobs.check_not_secret(arg, f"{program} argument")
        cl = jobs.client(address)
    except (ValueError, ConnectionError) as err:
        _fail(str(err))
    base = jobs.submission_base(program, sub.params, job_env)
    prepared = jobs.prepare(program, args, job_env, base, sub.params.get("config"), ship_code)
    try:
        sid, attached = jobs.submit_or_attach(cl, base, prepared, {jobs.METADATA_KEY: program})
    except (RuntimeError, ConnectionError, OSError) as err:
        _fail(f"submitting to {address or 'the cluster'} failed: {err}")
    finally:
        if prepared.workdir:
            shutil.rmtree(prepared.workdir, ignore_errors=True)
    if attached:
        console.print(f"job {sid} with the same command is already running: attaching to it instead of starting a "
                      "second writer on the same DST")
    else:
        console.print(f"submitted job {sid}")
    echo_result(sid)
    if not wait:
        console.print(f"follow it: ugcsr jobs logs {sid} --follow; stop it: ugcsr jobs stop {sid}")
        return
    try:
        status = jobs.follow(cl, sid, results_stream())
    except KeyboardInterrupt:
        console.print(f"\nstopped following; the job keeps running (ugcsr jobs stop {sid})")
        raise typer.Exit(130)
    console.print(f"job {sid}: {status}")
    raise typer.Exit(0 if status == "SUCCEEDED" else 1)


jobs_app = typer.Typer(help="Ray jobs on the cluster: list, status, logs, stop.", no_args_is_help=True)
ADDRESS = typer.Option(None, "--address", help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")


def _client(address):
    from cluster import jobs

    try:
        return jobs.client(address)
    except (ValueError, ConnectionError) as err:
        _fail(str(err))


@jobs_app.command("list", cls=Command)
def jobs_list(address: Optional[str] = ADDRESS,
              all_jobs: bool = typer.Option(False, "--all", help="every Ray job, not only ugcsr's")) -> None:
    """The cluster's ugcsr jobs, newest last."""
    from cluster.jobs import METADATA_KEY

    rows = [j for j in _client(address).list_jobs() if all_jobs or METADATA_KEY in (j.metadata or {})]
    for j in sorted(rows, key=lambda j: j.start_time or 0):
        echo_result(f"{j.submission_id or j.job_id}\t{j.status.value}\t{(j.entrypoint or '')[:100]}")


@jobs_app.command("status", cls=Command)
def jobs_status(job_id: str = typer.Argument(..., metavar="ID"), address: Optional[str] = ADDRESS) -> None:
    """Status, message and times of one job (JSON); exit code 0 once it SUCCEEDED, 1 if it failed or stopped."""
    cl = _client(address)
    try:
        info = cl.get_job_info(job_id)
    except RuntimeError as err:
        _fail(f"no job {job_id}: {err}")
    echo_result({"id": job_id, "status": info.status.value, "message": info.message,
                 "start_time": info.start_time, "end_time": info.end_time, "entrypoint": info.entrypoint})
    if info.status.value in ("FAILED", "STOPPED"):
        raise typer.Exit(1)


@jobs_app.command("logs", cls=Command)
def jobs_logs(job_id: str = typer.Argument(..., metavar="ID"), address: Optional[str] = ADDRESS,
              follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends")) -> None:
    """The job's log (its driver's stdout and stderr)."""
    from cluster import jobs

    cl = _client(address)
    try:
        if follow:
            status = jobs.follow(cl, job_id, results_stream())
            console.print(f"job {job_id}: {status}")
        else:
            echo_result(cl.get_job_logs(job_id), nl=False)
    except RuntimeError as err:
        _fail(f"no job {job_id}: {err}")


@jobs_app.command("stop", cls=Command)
def jobs_stop(job_id: str = typer.Argument(..., metavar="ID"), address: Optional[str] = ADDRESS) -> None:
    """Ask the job to stop (its DST lease is released by the driver, or expires)."""
    cl = _client(address)
    try:
        stopped = cl.stop_job(job_id)
    except RuntimeError as err:
        _fail(f"no job {job_id}: {err}")
    console.print(f"job {job_id}: {'stop requested' if stopped else 'already finished'}")


def register(app: typer.Typer) -> None:
    app.command(cls=Command, context_settings={"allow_interspersed_args": False})(submit)
    app.add_typer(jobs_app, name="jobs")
