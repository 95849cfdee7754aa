"""The per-image manifest (DESIGN.md): one Parquet row per input image and run.

Layout: DST/_manifest/run=<run id>/part-<hash>.parquet, written by the pipeline
itself (a sink stage in Ray tasks), so `DST/_manifest/**` reads as one table
(pyarrow/DuckDB hive partitioning adds a `run` column). Only Parquet lives
there; run summaries are under DST/_runs/.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import uuid
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster.lease import check_lease
from cluster.storage import StorageConfig, filesystem, is_local, join, uri_of, write_bytes_atomic

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

    def col(name, default):  # once per column: indexing lists below keeps a part O(rows)
        values = batch.get(name)
        return [default] * n if values is None else list(values)

    def ms(v):
        return float(v) if v is not None and not np.isnan(v) else None

    timings = {s: col(f"t_{s}_ms", None) for s in STAGES}
    c = {name: col(name, default) for name, default in (
        ("src_uri", ""), ("src_bytes", 0), ("src_width", 0), ("src_height", 0), ("error_type", ""), ("stage", ""),
        ("error_message", ""), ("dst_uri", ""), ("dst_width", 0), ("dst_height", 0), ("prompt", ""), ("tags", ""),
        ("decode_notes", ""), ("seed", 0), ("node_id", node_id))}
    has_tags, has_seed = "tags" in batch, "seed" in batch
    rows = []
    for i, image_id in enumerate(col("image_id", "")):
        err = str(c["error_type"][i])
        rows.append(
            dict(
                image_id=str(image_id),
                src_uri=str(c["src_uri"][i]),
                src_bytes=int(c["src_bytes"][i]),
                src_width=int(c["src_width"][i]),
                src_height=int(c["src_height"][i]),
                status="error" if err else "ok",
                stage=str(c["stage"][i]) or None,
                error_type=err or None,
                error_message=str(c["error_message"][i]) or None,
                dst_uri=str(c["dst_uri"][i]) or None,
                dst_width=int(c["dst_width"][i]) or None,
                dst_height=int(c["dst_height"][i]) or None,
                prompt=str(c["prompt"][i]) or None,
                tags=str(c["tags"][i]) if has_tags and not err else None,
                notes=str(c["decode_notes"][i]) or None,
                seed=int(c["seed"][i]) if has_seed else None,
                params_hash=params_hash,
                model_id=model_id,
                timings_ms={s: ms(v[i]) for s, v in timings.items()},
                node_id=str(c["node_id"][i]),
                finished_at=finished,
            )
        )
    return rows


def new_run_id() -> str:
    """Sortable by start time; unique across drivers."""
    return now().strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_dir(dst: str, run_id: str) -> str:
    """Each run's rows in their own hive-style folder: DST/_manifest/run=<id>/ (read as one table with a `run` column)."""
    return join(manifest_dir(dst), f"run={run_id}")


def part_name(image_ids) -> str:
    """Named by the rows it holds: a retried sink task rewrites the same part instead of adding a duplicate."""
    digest = hashlib.sha256("\n".join(sorted(str(i) for i in image_ids)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def write_part(rows: list[dict], *, dst: str, run_id: str, storage: dict, fence: dict | None = None) -> dict:
    """Writes manifest rows (rows_from_batch) as one Parquet part; returns ONE small count row.

    Called by the driver's ManifestSink (run.py). With `fence` (the DST lease's id and ttl), nothing is
    written once this run lost the lease.
    """
    if fence:
        check_lease(dst, storage, **fence)
    name = part_name(r["image_id"] for r in rows)
    buf = io.BytesIO()
    pq.write_table(to_table(rows), buf)
    write_bytes_atomic(join(run_dir(dst, run_id), name), buf.getvalue(), StorageConfig.model_validate(storage))
    errors = Counter(r["error_type"] for r in rows if r["error_type"])
    out = {"part": name, "rows": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
           "error_types": json.dumps(dict(errors))}
    for s in STAGES:
        values = [r["timings_ms"][s] for r in rows if r["timings_ms"][s]]
        out[f"{s}_ms_sum"], out[f"{s}_n"] = float(sum(values)), len(values)
    return out


def manifest_files(dst: str, storage: StorageConfig) -> list[str]:
    """Every Parquet file under DST/_manifest/ (any layout: run folders, compacted parts, old flat parts)."""
    fs, path = filesystem(manifest_dir(dst), storage)
    if not fs.exists(path):
        return []
    found = sorted(p for p in fs.find(path) if p.endswith(".parquet") and "/." not in p)
    fs.invalidate_cache()
    return [p if is_local(fs) else uri_of(fs, p) for p in found]


def read_manifest(dst: str, storage: StorageConfig, columns: list[str] | None = None) -> pa.Table:
    """The whole manifest in this process (tests, small tools; jobs read it with Ray tasks)."""
    tables = [_read(uri, storage, columns) for uri in manifest_files(dst, storage)]
    if not tables:
        return SCHEMA.empty_table().select(columns) if columns else SCHEMA.empty_table()
    return pa.concat_tables(tables, promote_options="default")


def _read(uri: str, storage: StorageConfig, columns: list[str] | None) -> pa.Table:
    from .listing import read_parquet_uri

    return read_parquet_uri(uri, storage, columns)


def done_piece(files: list[str], *, dst: str, storage: dict, params_hash: str, uri: str,
               buckets: int | None) -> dict:
    """(Ray task) image_ids with an `ok` row of this params_hash in some manifest files, stored as one piece
    at `uri` bucketed like the listing (pieces.py); counts and offsets back.

    The bucket is the output key's, recovered from dst_uri (DST/<dst_key>), so bucket k of the
    done set meets bucket k of the listing without any global view.
    """
    from .listing import bucket_key
    from .pieces import write_piece
    from actors.write import as_uri

    cfg = StorageConfig.model_validate(storage)
    prefix = as_uri(join(dst, ""))
    kept = []
    for part in files:
        t = _read(part, cfg, ["image_id", "status", "params_hash", "dst_uri"])
        mask = pc.and_(pc.equal(t["status"], "ok"), pc.equal(t["params_hash"], params_hash))
        kept.append(t.filter(mask).select(["image_id", "dst_uri"]))
    table = pa.concat_tables(kept) if kept else pa.table({"image_id": pa.array([], pa.string()), "dst_uri": pa.array([], pa.string())})
    keys = [bucket_key(u[len(prefix):], i) if u and u.startswith(prefix) else (u or "")
            for u, i in zip(table.column("dst_uri").to_pylist(), table.column("image_id").to_pylist())]
    return write_piece(uri, table.select(["image_id"]), keys, cfg, buckets)


def done_ids(dst: str, storage: StorageConfig, params_hash: str) -> pa.Array:
    """image_ids with an `ok` row made with these pixel settings (the resume rule), in this process."""
    table = read_manifest(dst, storage, ["image_id", "status", "params_hash"])
    mask = pc.and_(pc.equal(table["status"], "ok"), pc.equal(table["params_hash"], params_hash))
    return pc.unique(table.filter(mask)["image_id"])


# --- run summaries: outside _manifest/, which holds only Parquet ---


def runs_dir(dst: str) -> str:
    return join(dst, "_runs")


def write_summary(dst: str, run_id: str, summary: dict, storage: StorageConfig) -> None:
    data = json.dumps(summary, indent=2).encode()
    write_bytes_atomic(join(runs_dir(dst), run_id, "summary.json"), data, storage)
    write_bytes_atomic(join(runs_dir(dst), "latest", "summary.json"), data, storage)


# --- compaction ---


def _footers(files: list[str], storage: dict) -> list[tuple[int, bool]]:
    """(Ray task) (rows, in today's schema) of some Parquet files, from their footers."""
    cfg = StorageConfig.model_validate(storage)
    out = []
    for uri in files:
        fs, path = filesystem(uri, cfg)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            out.append((pf.metadata.num_rows, pf.schema_arrow.equals(SCHEMA)))
    return out


def conform(table: pa.Table) -> pa.Table:
    """A part in today's schema: columns older parts lack are null, columns no longer written are dropped."""
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
            for f in SCHEMA]
    return pa.Table.from_arrays(cols, schema=SCHEMA)


def _compact_group(files: list[str], out_uri: str, storage: dict) -> int:
    """(Ray task) Some parts of one run folder as one part: the latest row per (image_id, params_hash)."""
    cfg = StorageConfig.model_validate(storage)
    table = pa.concat_tables([conform(_read(uri, cfg, None)) for uri in files])
    if not len(table):
        return 0
    table = table.sort_by([("image_id", "ascending"), ("params_hash", "ascending"), ("finished_at", "ascending")])
    ids, params = table.column("image_id").to_pylist(), table.column("params_hash").to_pylist()
    last = [i for i in range(len(ids)) if i == len(ids) - 1 or (ids[i], params[i]) != (ids[i + 1], params[i + 1])]
    table = table.take(pa.array(last, pa.int64()))
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=64_000)
    write_bytes_atomic(out_uri, buf.getvalue(), cfg)
    return len(table)


def _folder(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def compact(dst: str, storage: StorageConfig, *, rows_per_file: int = 500_000, files_per_task: int = 64,
            max_retries: int = 3) -> dict:
    """Merge each run folder's parts into few of up to `rows_per_file` rows (a retried write batch's duplicate
    rows dropped: the latest per image_id and params_hash within the folder).

    Runs on the connected Ray cluster, one task per group of consecutive parts: no shuffle, a task holds at
    most `rows_per_file` rows (a part larger than that stays as it is), and every row keeps its run folder
    (the `run` column readers see). Rows of different runs are all kept: readers take the latest per image.
    New parts are written first, the old ones removed after: a crash in between leaves duplicates that
    resume and readers read harmlessly.
    """
    import ray

    files = manifest_files(dst, storage)
    if not files:
        raise FileNotFoundError(f"{dst} has no manifest (no Parquet under {manifest_dir(dst)}): give the DST of an "
                                "`ugcsr upscale` run")
    cfg = storage.model_dump(mode="json")
    footer = ray.remote(max_retries=max_retries)(_footers)
    chunks = [files[i : i + files_per_task] for i in range(0, len(files), files_per_task)]
    facts = [f for part in ray.get([footer.remote(c, cfg) for c in chunks]) for f in part]
    groups: list[list[str]] = []
    rows_in, last_folder = 0, None
    for uri, (rows, current) in zip(files, facts):  # sorted: a run folder's parts are consecutive
        if not groups or _folder(uri) != last_folder or rows_in + rows > rows_per_file:
            groups.append([])
            rows_in = 0
        groups[-1].append(uri)
        rows_in += rows
        last_folder = _folder(uri)
    schema_ok = dict(zip(files, (c for _, c in facts)))
    todo = [g for g in groups if len(g) > 1 or not schema_ok[g[0]]]  # a lone part in today's schema stays
    tag = new_run_id()
    task = ray.remote(max_retries=max_retries)(_compact_group)
    counts = ray.get([task.remote(g, join(_folder(g[0]), f"part-compacted-{tag}-{k:05d}.parquet"), cfg)
                      for k, g in enumerate(todo)])
    old = [uri for g in todo for uri in g]
    if old:
        fs, _ = filesystem(old[0], storage)
        fs.rm([filesystem(uri, storage)[1] for uri in old])  # one call: s3fs deletes in batches of 1000 keys
    rewritten = set(old)
    kept = sum(rows for (rows, _), uri in zip(facts, files) if uri not in rewritten)
    return {"files_before": len(files), "files_after": len(files) - len(old) + sum(1 for c in counts if c),
            "rows_before": sum(rows for rows, _ in facts), "rows_after": kept + int(sum(counts))}
