"""`ugcsr report`: what a run left, queried (`data`), rendered as one static HTML page (`render`, `templates/`).

`build_report` is imported on first use: `data` alone does not pay for Jinja2 and the plotting code.
"""

__all__ = ["build_report"]


def __getattr__(name: str):
    if name == "build_report":
        from .render import build_report

        return build_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
