"""The `ugcsr` Typer app: every command registered in one place.

Each command lives in its own module beside this one (`pipelines/cli/`) and imports
its heavy libraries (torch, Ray, diffusers) inside the function, so `--help`
and argument errors answer at once. Register new commands below with one line.
"""

from __future__ import annotations

import sys

import typer

from . import build_trainset, evaluate, jobs, manifest, report, train, upscale
from .common import Command, keep_stdout_for_results

# rich_markup_mode=None: click's plain help, where flags read `--dry-run` (typer's rich panels print `<bool>`).
# pretty_exceptions_show_locals=False: an unexpected traceback must not dump settings (or secrets) held in locals.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_show_locals=False,
                  help="Semantic-guided diffusion super-resolution of UGC images on Ray.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("ugcsr")
        except PackageNotFoundError:  # running from a source tree without installing
            v = "unknown (not installed)"
        typer.echo(f"ugcsr {v}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """Semantic-guided diffusion super-resolution of UGC images on Ray.

    Exit codes: 0 done, 1 some item failed and --fail-on-error was given,
    2 bad option or setting, 3 the job could not run.
    """
    import logging

    keep_stdout_for_results(ctx)
    ours = logging.getLogger("ugcsr")  # the driver's own lines (plan, lease): stderr, so `ray job logs` has them
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)


app.command("upscale", cls=Command)(upscale.upscale)
app.command("build-trainset", cls=Command)(build_trainset.build_trainset)
app.command("evaluate", cls=Command)(evaluate.evaluate)
app.command("report", cls=Command)(report.report)
app.command("train", cls=Command)(train.train)
app.command("train-export", cls=Command)(train.train_export)
app.add_typer(manifest.app, name="manifest")

jobs.register(app)  # `submit` and `jobs ...` (Ray Jobs API)


def run() -> None:  # pragma: no cover - console entry for `python -m pipelines.cli`
    app(prog_name="ugcsr")
