"""The driver's watchdog (pipelines/upscale/watchdog.py) ends a run left without GPU actors with its own error,
from inside Ray Data's blocking iterator; the rows already written still reach the manifest."""

import time

import pytest

from pipelines.upscale.run import _execute
from pipelines.upscale.watchdog import ActorWatchdog, NoGpuLeft


class _Stalled:
    """A dataset whose iterator yields one batch, then waits forever (no actor left to run the rest)."""

    def iter_batches(self, **_):
        yield "first"
        while True:
            time.sleep(0.05)


class _Sink:
    def __init__(self):
        self.added, self.closed = [], None

    def add(self, batch):
        self.added.append(batch)

    def close(self, flush=True):
        self.closed = flush


class _Lease:
    dst, uri, storage, fence, lost = "/nowhere", "/nowhere/_state/lease", None, {}, False

    def check(self):
        pass


class _NoGpus(ActorWatchdog):
    def tick(self, now=None):
        self.error = NoGpuLeft("no GPU actor has been alive for 0 s: 1 GPU(s) quarantined")


def test_the_watchdog_interrupts_a_stalled_execution_with_a_clear_error():
    import signal

    # As in `ugcsr upscale`: Python's own SIGINT handler (an earlier Ray Train test in this process set its own).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    sink, watchdog = _Sink(), _NoGpus(journal=None, timeout_s=0, interval_s=0.2)
    with pytest.raises(NoGpuLeft, match="quarantined"):
        _execute(_Stalled(), sink, None, _Lease(), watchdog)
    watchdog.stop()
    signal.signal(signal.SIGINT, previous)
    assert sink.added == ["first"] and sink.closed is True, "what was written is flushed into the manifest"


def test_the_watchdog_never_interrupts_a_thread_or_a_foreign_sigint_handler():
    """interrupt_main reaches the main thread's SIGINT handler: from a run in another thread, or with a handler
    someone else installed, it would hit the wrong code. The watchdog then only logs."""
    import threading

    watchdog = _NoGpus(journal=None, timeout_s=0, interval_s=3600)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_flag(watchdog)))
    thread.start()
    thread.join()
    import signal

    previous = signal.signal(signal.SIGINT, lambda *_: None)  # e.g. Ray Train's, left by a trainer
    try:
        seen.append(_flag(watchdog))
    finally:
        signal.signal(signal.SIGINT, previous)
    watchdog.stop()
    assert seen == [False, False]


def _flag(watchdog) -> bool:
    with watchdog.waiting():
        return watchdog._waiting
