"""Reading what a run left behind (manifest, summary, listing), for `evaluate` and `report`.

The manifest's layout may be flat (`_manifest/part-*.parquet`) or partitioned
by run (`_manifest/run=<id>/*.parquet`); both are read as one hive-partitioned
pyarrow dataset. Where summary.json lives is decided in `summary_candidates`
alone, so a layout change touches one function.
"""

from __future__ import annotations

import io
import json
import posixpath
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from cluster.storage import StorageConfig, filesystem, join

from .listing import read_listing_meta


def manifest_files(dst: str, storage: StorageConfig | None = None) -> tuple[object, str, list[str]]:
    """(fs, manifest folder path, Parquet files under it), skipping temp/hidden files."""
    fs, root = filesystem(join(dst, "_manifest"), storage)
    root = root.rstrip("/")
    if not fs.isdir(root):
        return fs, root, []
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_")))
    return fs, root, files


def read_run_manifest(dst: str, storage: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table | None:
    """Every manifest row of DST (all runs), with a `run` column; None when DST has no manifest.

    `run` comes from a `run=<id>` folder (hive partitioning) or, in the flat
    layout, from the part's name (`part-<run>-<n>.parquet`).
    """
    fs, root, files = manifest_files(dst, storage)
    if not files:
        return None
    # Parts written by different versions may differ in columns: read them under the union of their schemas.
    schemas = []
    for f in files:
        with fs.open(f, "rb") as fh:
            schemas.append(pq.ParquetFile(fh).schema_arrow)
    dataset = pds.dataset(files, filesystem=fs, format="parquet", partitioning=pds.partitioning(flavor="hive"),
                          partition_base_dir=root)
    schema = pa.unify_schemas(schemas + [dataset.schema], promote_options="permissive")
    if "run" not in schema.names:
        schema = schema.append(pa.field("run", pa.string()))
    cols = list(dict.fromkeys([c for c in columns if c in schema.names] + ["run"])) if columns else None
    tables = []
    for frag in dataset.get_fragments():
        table = frag.to_table(schema=schema, columns=cols)
        named = _RUN_IN_NAME.match(posixpath.basename(frag.path))
        if named and table["run"].null_count == len(table):
            table = table.set_column(table.schema.get_field_index("run"), "run",
                                     pa.array([named.group(1)] * len(table), pa.string()))
        tables.append(table)
    return pa.concat_tables(tables)


_RUN_IN_NAME = re.compile(r"part-([0-9A-Za-z]+)-\d+\.parquet$")


def summary_candidates(dst: str) -> list[str]:
    """Where a run's summary.json may be, newest layout first."""
    return [join(dst, "_runs", "latest", "summary.json"), join(dst, "_runs", "latest.json"),
            join(dst, "_runs", "summary.json"), join(dst, "_state", "summary.json"), join(dst, "_manifest", "summary.json")]


def read_run_summary(dst: str, storage: StorageConfig | None = None) -> dict | None:
    """The latest summary.json of an upscale run at DST, wherever this version keeps it; None if none."""
    for uri in summary_candidates(dst):
        fs, path = filesystem(uri, storage)
        if fs.isfile(path):
            data = json.loads(fs.cat_file(path))
            pointer = data.get("run_id") or data.get("run") if isinstance(data, dict) and "by_status" not in data else None
            if isinstance(pointer, str):  # a `latest` that names the run instead of holding its summary
                fs2, path2 = filesystem(join(dst, "_runs", pointer, "summary.json"), storage)
                if fs2.isfile(path2):
                    return json.loads(fs2.cat_file(path2))
                continue
            return data
    # `_runs/<id>/summary.json` without a `latest`: the most recently modified one.
    fs, runs = filesystem(join(dst, "_runs"), storage)
    found = fs.glob(runs.rstrip("/") + "/*/summary.json") if fs.isdir(runs) else []
    if found:
        return json.loads(fs.cat_file(max(found, key=lambda p: _modified(fs, p))))
    return None


def _modified(fs, path: str) -> float:
    info = fs.info(path)
    at = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    return at.timestamp() if hasattr(at, "timestamp") else float(at)


def read_listing(dst: str, storage: StorageConfig | None = None) -> pa.Table | None:
    """The upscale listing (image_id, src_uri, dst_key) if DST kept one.

    Current layout: `_state/listing.json` names the committed listing, sharded as
    `_state/listing/<id>/part-*.parquet`; older runs kept one `_state/listing.parquet`.
    """
    meta = read_listing_meta(dst, storage or StorageConfig())  # None when absent or out of range
    if meta:
        fs, folder = filesystem(join(dst, "_state", "listing", meta["listing_id"]), storage)
        parts = sorted(fs.glob(folder.rstrip("/") + "/part-*.parquet")) if fs.isdir(folder) else []
        if parts:
            return pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(p))) for p in parts])
    fs, path = filesystem(join(dst, "_state", "listing.parquet"), storage)
    return pq.read_table(io.BytesIO(fs.cat_file(path))) if fs.exists(path) else None


def latest_rows(table: pa.Table) -> list[dict]:
    """One row per image_id: the last one written (by finished_at), so a retried image shows its final state."""
    return latest_table(table).to_pylist()


def latest_table(table: pa.Table) -> pa.Table:
    """latest_rows as a table, computed in Arrow/numpy (no Python object per row): per image_id the row with the
    latest finished_at (null: earliest), the last in manifest order among equals; images in order of first row."""
    n = len(table)
    if not n:
        return table
    codes = pc.dictionary_encode(table.column("image_id")).combine_chunks().indices
    codes = pc.fill_null(codes, -1).to_numpy(zero_copy_only=False)
    if "finished_at" in table.column_names:
        at = pc.cast(table.column("finished_at"), pa.int64())
        at = pc.fill_null(at, np.iinfo(np.int64).min).to_numpy(zero_copy_only=False)
    else:
        at = np.zeros(n, np.int64)
    order = np.lexsort((np.arange(n), at, codes))  # by image, then time, then manifest order
    grouped = codes[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    last = order[np.r_[starts[1:], n] - 1]
    first = np.minimum.reduceat(order, starts)
    return table.take(pa.array(last[np.argsort(first, kind="stable")]))
