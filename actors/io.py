"""The IO stages as plain functions, for Ray Data task pools (cheap to build per batch).

Kept in their own light module: a task worker that unpickles them imports
only what reading, decoding and writing need, not torch or diffusers.
"""

from __future__ import annotations

from cluster.lease import check_lease

from .decode import DecodeStage, sort_by_working_size
from .batch import concat_rows, size
from .guard import guarded_call
from .progress import report
from .read import ReadStage
from .write import WriteStage


def read_decode(batch: dict, storage: dict, max_pixels: int, fetch_threads: int = 8, group: dict | None = None,
                journal=None, max_crashes: int = 1, policy: dict | None = None, max_bytes: int | None = None,
                max_batch_pixels: int | None = None):
    """Fetch (concurrently, only URIs `policy` allows) and decode; rows leave sorted by working size when `group`
    gives the SR geometry, so the SR stage's consecutive batches hold images of one padded size (full batches).

    A generator (Ray Data takes each yield as output): with `max_batch_pixels`, rows are fetched and decoded
    `fetch_threads` at a time and yielded once the decoded pixels reach the budget, so a task never holds a
    whole batch of large photos (32 x 64 MP would be 6 GB); each yield is sorted within itself.
    """
    read = ReadStage(storage, threads=fetch_threads, policy=policy, max_bytes=max_bytes)
    decode = DecodeStage(max_pixels)
    n = size(batch)
    step = max(1, fetch_threads) if max_batch_pixels else n
    held, pixels = [], 0
    for start in range(0, n, step):
        part = {k: v[start : start + step] for k, v in batch.items()}
        out = guarded_call(lambda b: decode(read(b)), part, "decode", journal, max_crashes)
        held.append(out)
        pixels += sum(int(w) * int(h) for w, h in zip(out["src_width"], out["src_height"]))
        if max_batch_pixels and pixels >= max_batch_pixels and start + step < n:
            yield _sorted(held, group)
            held, pixels = [], 0
    if held:
        yield _sorted(held, group)


def _sorted(parts: list[dict], group: dict | None) -> dict:
    out = parts[0] if len(parts) == 1 else concat_rows(parts)
    return sort_by_working_size(out, **group) if group else out


def write(batch: dict, dst: str, fmt: str, quality: int, storage: dict, journal=None, max_crashes: int = 1,
          progress=None, fence: dict | None = None) -> dict:
    if fence:  # a run that lost the DST lease writes nothing more (the task fails; so does the run)
        check_lease(dst, storage, **fence)
    out = guarded_call(WriteStage(dst, fmt, quality, storage), batch, "encode", journal, max_crashes)
    return report(progress, out)
