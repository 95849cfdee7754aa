"""The per-image manifest (DESIGN.md): one Parquet row per input image, streamed as parts."""

from __future__ import annotations

import datetime as dt
import io
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster.storage import StorageConfig, filesystem, join, write_bytes_atomic

STAGES = ("decode", "semantic", "sr", "encode")
TIMINGS = pa.struct([(k, pa.float64()) for k in STAGES])
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
        ("tags", pa.string()),  # the tagger's tags (RAM+DAPE), or the fixed tags
        ("notes", pa.string()),  # decode facts: source mode, alpha handling, frames used
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


def manifest_dir(dst: str) -> str:
    return join(dst, "_manifest")


def rows_from_batch(batch: dict, *, params_hash: str, model_id: str, node_id: str) -> list[dict]:
    """Manifest rows from a batch that went through the write stage."""
    n = len(batch["image_id"])
    finished = now()

    def col(name, default):
        values = batch.get(name)
        return [default] * n if values is None else list(values)

    timings = {s: col(f"t_{s}_ms", None) for s in STAGES}
    rows = []
    for i, (err, stage) in enumerate(zip(col("error_type", ""), col("stage", ""))):
        rows.append(
            dict(
                image_id=str(batch["image_id"][i]),
                src_uri=str(batch["src_uri"][i]),
                src_bytes=int(col("src_bytes", 0)[i]),
                src_width=int(col("src_width", 0)[i]),
                src_height=int(col("src_height", 0)[i]),
                status="error" if err else "ok",
                stage=str(stage) or None,
                error_type=str(err) or None,
                error_message=str(col("error_message", "")[i]) or None,
                dst_uri=str(col("dst_uri", "")[i]) or None,
                dst_width=int(col("dst_width", 0)[i]) or None,
                dst_height=int(col("dst_height", 0)[i]) or None,
                prompt=str(col("prompt", "")[i]) or None,
                tags=str(col("tags", "")[i]) if "tags" in batch and not err else None,
                notes=str(col("decode_notes", "")[i]) or None,
                seed=int(col("seed", 0)[i]) if "seed" in batch else None,
                params_hash=params_hash,
                model_id=model_id,
                timings_ms={s: (float(v[i]) if v[i] is not None and not np.isnan(v[i]) else None) for s, v in timings.items()},
                node_id=str(col("node_id", node_id)[i]),
                finished_at=finished,
            )
        )
    return rows


class ManifestWriter:
    """Writes rows as Parquet parts under DST/_manifest/ as they arrive (each part one atomic write)."""

    def __init__(self, dst: str, storage: StorageConfig, rows_per_part: int = 1024, max_delay_s: float = 5.0):
        self.dir = manifest_dir(dst)
        self.storage = storage
        self.run = uuid.uuid4().hex[:12]
        self.rows_per_part = rows_per_part
        self.pending: list[dict] = []
        self.parts = 0
        self.max_delay_s = max_delay_s
        self.last_flush = time.monotonic()

    def add(self, rows: list[dict]) -> None:
        """Buffer rows; a killed job loses at most `max_delay_s` of rows (their images are redone on resume)."""
        self.pending += rows
        if len(self.pending) >= self.rows_per_part or time.monotonic() - self.last_flush >= self.max_delay_s:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        buf = io.BytesIO()
        pq.write_table(to_table(self.pending), buf)
        write_bytes_atomic(join(self.dir, f"part-{self.run}-{self.parts:06d}.parquet"), buf.getvalue(), self.storage)
        self.parts += 1
        self.pending = []
        self.last_flush = time.monotonic()


def read_manifest(dst: str, storage: StorageConfig, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(manifest_dir(dst), storage)
    if not fs.exists(path):
        return SCHEMA.empty_table().select(columns) if columns else SCHEMA.empty_table()
    tables = [pq.read_table(io.BytesIO(fs.cat_file(p)), columns=columns) for p in sorted(fs.glob(path.rstrip("/") + "/part-*.parquet"))]
    if not tables:
        return SCHEMA.empty_table().select(columns) if columns else SCHEMA.empty_table()
    return pa.concat_tables(tables)


def done_ids(dst: str, storage: StorageConfig, params_hash: str) -> pa.Array:
    """image_ids with an `ok` row made with these pixel settings (the resume rule)."""
    table = read_manifest(dst, storage, ["image_id", "status", "params_hash"])
    mask = pc.and_(pc.equal(table["status"], "ok"), pc.equal(table["params_hash"], params_hash))
    return pc.unique(table.filter(mask)["image_id"])
