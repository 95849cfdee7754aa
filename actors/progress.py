"""Per-batch progress: the write stage counts the rows it finishes, the driver waits on the count.

Manifest parts are sized for readers (`manifest_rows_per_file`, 1024 rows by
default), so they arrive far too rarely to drive a progress display. Each write
batch adds its rows here instead (fire-and-forget); the driver's poller waits
for a change. A retried write batch counts twice, so the driver treats these
figures as a display hint and corrects them from the manifest parts at the end.
"""

from __future__ import annotations

import asyncio


class ProgressCounter:
    """(Ray async actor, no CPU) rows that left the write stage: done, of which failed."""

    def __init__(self):
        self.done = self.errors = 0
        self._changed = asyncio.Event()

    async def add(self, done: int, errors: int) -> None:
        self.done += done
        self.errors += errors
        self._changed.set()

    async def wait(self, seen: tuple[int, int], timeout_s: float) -> tuple[int, int]:
        """The counts, as soon as they differ from `seen` or after `timeout_s`."""
        if (self.done, self.errors) == tuple(seen):
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        self._changed.clear()
        return self.done, self.errors


def report(counter, batch: dict) -> dict:
    """Tell `counter` (or nobody, when None) about a batch that left the write stage; returns the batch."""
    if counter is not None:
        n = len(batch.get("image_id", ()))
        errors = sum(1 for e in batch.get("error_type", ()) if e)
        counter.add.remote(n, errors)
    return batch
