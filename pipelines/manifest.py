"""The per-image manifest (DESIGN.md): one Parquet row per input image."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

TIMINGS = pa.struct([(k, pa.float64()) for k in ("decode", "semantic", "sr", "encode")])
SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("src_uri", pa.string()),
        ("src_bytes", pa.int64()),
        ("src_width", pa.int32()),
        ("src_height", pa.int32()),
        ("status", pa.string()),  # ok | error | skipped
        ("stage", pa.string()),  # where it failed
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("dst_uri", pa.string()),
        ("dst_width", pa.int32()),
        ("dst_height", pa.int32()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("params_hash", pa.string()),
        ("model_id", pa.string()),
        ("timings_ms", TIMINGS),
        ("node_id", pa.string()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)
