"""Progress display for long jobs: a rich bar on a terminal, periodic log lines anywhere else.

The same object serves both: `starting(message)` for phases before the first
result (listing, Ray start-up, actors loading models), `start(total)` once the
work is known, `advance(ok, errors)` per batch of results, `close()` at the end.
Rate and ETA count from the first result, so actor start-up does not make the
steady-state rate look slow (start-up is shown as its own phase with its
elapsed time). Without a terminal (e.g. under `ray job logs`, or piped to a
file) a line with done/total, images/s, ETA and errors so far is written every
`interval_s` seconds, also while nothing arrives, so a stalled start-up is
visible in the log.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of a job over `total` items; thread-safe (the log-line ticker runs in a thread)."""

    def __init__(self, what: str = "images", *, stream: TextIO | None = None, tty: bool | None = None,
                 interval_s: float = 30.0):
        self.what = what
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval_s = interval_s
        self.total: int | None = None
        self.ok = self.errors = 0
        self.phase = "starting"
        self.t0 = time.monotonic()
        self.phase_t0 = self.t0
        self.first_result: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._bar = self._task = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                console=Console(file=self.stream), transient=False,
            )
            self._task = self._bar.add_task("starting", total=None, status="")
            self._bar.start()
        else:
            self._ticker = threading.Thread(target=self._tick, name="progress-log", daemon=True)
            self._ticker.start()

    # ------------------------------------------------------------------ the hook API

    def starting(self, message: str) -> None:
        """A phase before results arrive (e.g. 'starting 1 SR + 1 semantic actors (loading models)')."""
        with self._lock:
            self.phase, self.phase_t0 = message, time.monotonic()
        if self._bar is not None:
            self._bar.update(self._task, description=message)
        else:
            self._line(message)

    def note(self, message: str) -> None:
        """A one-off message (e.g. how SRC was listed), printed above the bar or as a log line."""
        if self._bar is not None:
            self._bar.console.print(message, highlight=False, soft_wrap=True)
        else:
            self._line(message)

    def start(self, total: int) -> None:
        """The number of items this run will process."""
        with self._lock:
            self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def advance(self, ok: int = 0, errors: int = 0) -> None:
        """One batch of results: `ok` finished, `errors` failed."""
        with self._lock:
            now = time.monotonic()
            if self.first_result is None:
                self.first_result = now
                self.phase = "processing"
            self.ok += ok
            self.errors += errors
        if self._bar is not None:
            self._bar.update(self._task, description=self.what, completed=self.done, status=self.status())

    def close(self, *, completed: bool = True) -> None:
        """Stop; the last line gives the overall rate (start-up included) beside the failures.

        `completed=False` (the job raised): the display stops where it was, showing the phase that failed.
        """
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=1)
        wall = time.monotonic() - self.t0
        final = f"{self.done / wall if wall > 0 else 0:.3g} {self.what}/s overall, {self.errors} failed"
        if self._bar is not None:
            if completed:
                self._bar.update(self._task, description=self.what, completed=self.done, status=final)
            self._bar.stop()
            self._bar = None
        elif self.total is not None and completed:
            self._line(f"[{_duration(wall)}] {self.done}/{self.total} {self.what}, {final}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(completed=exc_type is None)

    # ------------------------------------------------------------------ figures

    @property
    def done(self) -> int:
        return self.ok + self.errors

    def rate(self) -> float | None:
        """Items per second since the first result (start-up excluded), once two batches are in."""
        if self.first_result is None:
            return None
        elapsed = time.monotonic() - self.first_result
        return self.done / elapsed if elapsed > 0.5 else None

    def eta(self) -> float | None:
        rate = self.rate()
        if self.total is None or not rate:
            return None
        return max(0, self.total - self.done) / rate

    def status(self) -> str:
        rate = self.rate()
        rate_s = f"{rate:.2f} {self.what}/s" if rate else f"- {self.what}/s"
        return f"{rate_s}, ETA {_duration(self.eta())}, {self.errors} failed"

    def line(self) -> str:
        """The log line: done/total, rate, ETA, errors (or the start-up phase and its elapsed time)."""
        with self._lock:
            now = time.monotonic()
            if self.first_result is None:
                return f"[{_duration(now - self.t0)}] {self.phase} ({_duration(now - self.phase_t0)} so far)"
            total = "?" if self.total is None else self.total
            return f"[{_duration(now - self.t0)}] {self.done}/{total} {self.what}, {self.status()}"

    def _line(self, text: str) -> None:
        print(text if text.startswith("[") else f"[{_duration(time.monotonic() - self.t0)}] {text}",
              file=self.stream, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._line(self.line())
