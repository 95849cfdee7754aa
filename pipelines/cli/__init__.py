"""The `ugcsr` command line: one module per command, registered on the app in `app.py`.

Rule that keeps `ugcsr --help` and argument errors fast (tests/pipelines/test_cli_ux.py
times them for every registered command): a command module imports only
typer, the standard library and `common`; torch, Ray, diffusers, pyarrow and
the pipelines are imported inside the command function, after the arguments
are parsed. To add a command: a new module here with one function, and one
`app.command(...)` line in `app.py`. `progress.py` is the terminal/log display
that the long-running commands share.
"""

from .app import app

__all__ = ["app"]
