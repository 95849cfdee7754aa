"""The IO stages as plain functions, for Ray Data task pools (cheap to build per batch).

Kept in their own light module: a task worker that unpickles them imports
only what reading, decoding and writing need, not torch or diffusers.
"""

from __future__ import annotations

from cluster.lease import check_lease

from .decode import DecodeStage, sort_by_working_size
from .guard import guarded_call
from .progress import report
from .read import ReadStage
from .write import WriteStage


def read_decode(batch: dict, storage: dict, max_pixels: int, fetch_threads: int = 8, group: dict | None = None,
                journal=None, max_crashes: int = 1, policy: dict | None = None, max_bytes: int | None = None) -> dict:
    """Fetch (concurrently, only URIs `policy` allows) and decode; rows leave sorted by working size when `group`
    gives the SR geometry, so the SR stage's consecutive batches hold images of one padded size (full batches)."""
    read = ReadStage(storage, threads=fetch_threads, policy=policy, max_bytes=max_bytes)
    decode = DecodeStage(max_pixels)
    out = guarded_call(lambda b: decode(read(b)), batch, "decode", journal, max_crashes)
    return sort_by_working_size(out, **group) if group else out


def write(batch: dict, dst: str, fmt: str, quality: int, storage: dict, journal=None, max_crashes: int = 1,
          progress=None, fence: dict | None = None) -> dict:
    if fence:  # a run that lost the DST lease writes nothing more (the task fails; so does the run)
        check_lease(dst, storage, **fence)
    out = guarded_call(WriteStage(dst, fmt, quality, storage), batch, "encode", journal, max_crashes)
    return report(progress, out)
