"""Planning pieces: what one planning task found, bucketed, stored as one object; a planner reads its byte range.

A task's rows are sorted by sub-bucket (the top 12 bits of the CRC-32 of their key) and written as one Arrow
IPC stream, one record batch per non-empty sub-bucket; the task returns the byte offset of every sub-bucket.
Bucket k of B is the contiguous sub-bucket span `bucket_span(k, B)`, so B can be chosen after listing (from the
count) and a planner reads its part of a piece with one ranged GET.

Why storage and not Ray objects: T tasks x B buckets small tables would be ~10^5 objects below Ray's inline
limit, all held in the driver's process (issue 19); here the driver holds T offset arrays, whatever the corpus.
"""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster.storage import StorageConfig, read_bytes, write_bytes_atomic

SUB_BUCKETS = 4096  # 2**12: a bucket count up to this splits the sub-buckets into contiguous spans
CHUNK_ROWS = 256  # rows per record batch when the bucket count is not known yet (a few KiB each)
_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def sub_bucket_of(key: str) -> int:
    return zlib.crc32(key.encode("utf-8")) >> 20


def bucket_of(key: str, buckets: int) -> int:
    return sub_bucket_of(key) * buckets // SUB_BUCKETS


def bucket_span(k: int, buckets: int) -> tuple[int, int]:
    """The sub-buckets [lo, hi) of bucket k of `buckets`: exactly those s with s * buckets // SUB_BUCKETS == k."""
    return -(-k * SUB_BUCKETS // buckets), -(-(k + 1) * SUB_BUCKETS // buckets)


def write_piece(uri: str, table: pa.Table, keys: list[str], storage: StorageConfig,
                buckets: int | None = None) -> dict:
    """Store `table` (one key per row) as a piece at `uri`; {"rows", "offsets"} for the driver (no file if empty).

    Record batches end on bucket spans when `buckets` is known, else they hold sub-bucket runs of at least
    CHUNK_ROWS rows (a planner then reads a little more than its bucket and filters on the `sub` column).
    offsets[s] is where the batch holding sub-bucket s starts; offsets[SUB_BUCKETS] is the piece's size.
    """
    offsets = np.zeros(SUB_BUCKETS + 1, np.int64)
    if not len(table):
        return {"rows": 0, "offsets": offsets}
    subs = np.fromiter((sub_bucket_of(k) for k in keys), dtype=np.int32, count=len(keys))
    order = np.argsort(subs, kind="stable")
    counts = np.bincount(subs, minlength=SUB_BUCKETS)
    table = table.take(pa.array(order)).append_column("sub", pa.array(subs[order].astype(np.uint16)))
    if buckets:
        cuts = sorted({bucket_span(k, buckets)[0] for k in range(buckets)} | {SUB_BUCKETS})
    else:
        cuts, run = [0], 0
        for s in range(SUB_BUCKETS):
            run += int(counts[s])
            if run >= CHUNK_ROWS:
                cuts.append(s + 1)
                run = 0
        if cuts[-1] != SUB_BUCKETS:
            cuts.append(SUB_BUCKETS)
    sink, row = pa.BufferOutputStream(), 0
    with pa.ipc.new_stream(sink, table.schema, options=_OPTIONS) as writer:
        writer.write_batch(_empty_batch(table.schema))  # the schema goes out here: spans hold batches only
        for lo, hi in zip(cuts, cuts[1:]):
            offsets[lo:hi] = sink.tell()
            n = int(counts[lo:hi].sum())
            if n:
                for batch in table.slice(row, n).combine_chunks().to_batches():
                    writer.write_batch(batch)
                row += n
        offsets[SUB_BUCKETS] = sink.tell()
    write_bytes_atomic(uri, sink.getvalue().to_pybytes(), storage)
    return {"rows": len(table), "offsets": offsets}


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in schema], schema=schema)


def spans(pieces: list[tuple[str, dict]], k: int, buckets: int) -> list[tuple[str, int, int]]:
    """(uri, start, end) of the batches that may hold bucket k, in each piece with rows."""
    lo, hi = bucket_span(k, buckets)
    out = []
    for uri, piece in pieces:
        if not piece["rows"]:
            continue
        offsets = piece["offsets"]
        start = int(offsets[lo])
        after = min(SUB_BUCKETS, int(np.searchsorted(offsets, offsets[hi - 1], side="right")))
        end = int(offsets[after])  # where the batch holding sub-bucket hi-1 ends
        if end > start:
            out.append((uri, start, end))
    return out


def read_spans(ranges: list[tuple[str, int, int]], schema: pa.Schema, storage: StorageConfig, k: int,
               buckets: int, threads: int = 8) -> pa.Table:
    """Bucket k's rows in some byte ranges of pieces, as one table of `schema` (one ranged GET per piece)."""
    piece_schema = schema.append(pa.field("sub", pa.uint16()))

    def one(r):
        data = read_bytes(r[0], storage, span=(r[1], r[2]))
        reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(data))
        return [pa.ipc.read_record_batch(message, piece_schema) for message in reader]

    if not ranges:
        return schema.empty_table()
    with ThreadPoolExecutor(max(1, min(threads, len(ranges)))) as pool:
        batches = [b for part in pool.map(one, ranges) for b in part]
    table = pa.Table.from_batches(batches, schema=piece_schema)
    lo, hi = bucket_span(k, buckets)
    sub = table.column("sub")
    table = table.filter(pc.and_(pc.greater_equal(sub, lo), pc.less(sub, hi)))
    return table.drop_columns(["sub"])
