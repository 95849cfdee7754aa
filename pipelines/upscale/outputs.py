"""Reading what a run left behind (manifest, summary, listing), for `evaluate` and `report`.

The manifest's layout may be flat (`_manifest/part-*.parquet`) or partitioned
by run (`_manifest/run=<id>/*.parquet`); both are read as one hive-partitioned
pyarrow dataset. Where summary.json lives is decided in `summary_candidates`
alone, so a layout change touches one function. `report` and `evaluate` read
the manifest bucket by bucket of images (`RunManifest.latest_buckets`), never
all its rows at once: it may hold 10^8.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from cluster.storage import StorageConfig, filesystem, join

from .listing import read_listing_meta
from .pieces import SUB_BUCKETS, bucket_span, read_spans, write_piece


def manifest_files(dst: str, storage: StorageConfig | None = None) -> tuple[object, str, list[str]]:
    """(fs, manifest folder path, Parquet files under it), skipping temp/hidden files."""
    fs, root = filesystem(join(dst, "_manifest"), storage)
    root = root.rstrip("/")
    if not fs.isdir(root):
        return fs, root, []
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_")))
    return fs, root, files


BUCKET_ROWS = 1_000_000  # the most rows of one bucket in memory at once (half that on average: the hash spreads)
SPILL_ROWS = 65_536  # manifest rows read, tallied and spilled at a time (a few tens of MB)


@dataclass
class RunManifest:
    """The manifest parts of a DST, their footers read, their rows not: those come part by part (`batches`)."""

    files: list[str]
    root: str  # the manifest folder, that hive partitions are relative to
    filesystem: object  # pyarrow's view of the storage
    partitioning: pds.Partitioning  # as discovered over all parts
    schema: pa.Schema  # the union of the parts' schemas, with `run`
    columns: list[str]  # those read, in this order
    rows: int  # all parts' rows, from the footers

    def batches(self) -> Iterator[pa.Table]:
        """Every row, part by part in manifest order, at most SPILL_ROWS at a time, with `run` filled in."""
        parquet = pds.ParquetFileFormat()
        for path in self.files:
            # A fragment per part, dropped after it: a dataset's fragments keep each part's metadata once
            # scanned (~80 KB a part, GBs for 10^5 parts).
            frag = parquet.make_fragment(path, filesystem=self.filesystem,
                                         partition_expression=self.partitioning.parse(path[len(self.root):]))
            named = _RUN_IN_NAME.match(posixpath.basename(path))
            for batch in frag.to_batches(schema=self.schema, columns=self.columns, batch_size=SPILL_ROWS):
                table = pa.Table.from_batches([batch])
                if named and table["run"].null_count == len(table):
                    table = table.set_column(table.schema.get_field_index("run"), "run",
                                             pa.array([named.group(1)] * len(table), pa.string()))
                yield table

    def empty(self) -> pa.Table:
        return pa.schema([self.schema.field(c) for c in self.columns]).empty_table()

    def latest_buckets(self, *, on_rows: Callable[[pa.Table], None] | None = None, bucket_rows: int | None = None,
                       spill_dir: str | None = None) -> Iterator[pa.Table]:
        """Each image's latest row (`latest_table`), one bucket of images at a time, in bounded memory.

        The rows are read once, SPILL_ROWS at a time (each chunk goes to `on_rows` first, for tallies over all
        rows), and spilled to a temporary local folder as pieces bucketed by the CRC of image_id (pieces.py).
        B comes from the footers' row count: a bucket gets half of `bucket_rows` on average, so the hash's spread
        stays under it. Then each bucket's rows are read back and reduced: one bucket's rows at a time in memory,
        whatever the manifest's size (a small one is one bucket, the same path). Every table, a chunk or a bucket's
        latest rows, has a `_row` column: the row's place in the whole manifest (`read_run_manifest`'s row
        number); in a bucket's latest rows, that of the image's first row, and the rows are in that order.
        """
        limit = bucket_rows or BUCKET_ROWS
        buckets = max(1, min(SUB_BUCKETS // 2, -(-2 * self.rows // limit)))
        with tempfile.TemporaryDirectory(prefix="ugcsr-latest-", dir=spill_dir) as folder:
            pieces = self._spill(folder, buckets, on_rows)
            schema = self.empty().schema.append(pa.field("_row", pa.int64()))
            for k in range(buckets):
                ranges = [(uri, int(at[k]), int(at[k + 1])) for uri, at in pieces if at[k + 1] > at[k]]
                latest = latest_table(read_spans(ranges, schema, _LOCAL, k, buckets), first="_row")
                yield latest
                del latest  # before the next bucket is read: one bucket in memory at a time

    def _spill(self, folder: str, buckets: int, on_rows) -> list[tuple[str, np.ndarray]]:
        """Write the rows as pieces of SPILL_ROWS or so; (uri, where each bucket starts and the last ends) of each."""
        starts = [bucket_span(k, buckets)[0] for k in range(buckets)] + [SUB_BUCKETS]
        pieces, pending, seen = [], [], 0

        def spill():
            nonlocal seen
            chunk = pa.concat_tables(pending)
            pending.clear()
            chunk = chunk.append_column("_row", pa.array(np.arange(seen, seen + len(chunk), dtype=np.int64)))
            seen += len(chunk)
            if on_rows:
                on_rows(chunk)
            uri = posixpath.join(folder, f"piece-{len(pieces):06d}.arrow")
            keys = [k or "" for k in chunk["image_id"].to_pylist()]  # a null image_id is one image, as in latest_table
            pieces.append((uri, write_piece(uri, chunk, keys, _LOCAL, buckets)["offsets"][starts]))

        for table in self.batches():
            if len(table):
                pending.append(table)
            if sum(map(len, pending)) >= SPILL_ROWS:
                spill()
        if pending:
            spill()
        return pieces


_LOCAL = StorageConfig()  # the spill folder is a local one


def open_run_manifest(dst: str, storage: StorageConfig | None = None,
                      columns: list[str] | None = None) -> RunManifest | None:
    """DST's manifest parts (all runs) as one `RunManifest` whose rows have a `run` column; None when DST has none.

    `run` comes from a `run=<id>` folder (hive partitioning) or, in the flat
    layout, from the part's name (`part-<run>-<n>.parquet`).
    """
    fs, root, files = manifest_files(dst, storage)
    if not files:
        return None
    # Parts written by different versions may differ in columns: read them under the union of their schemas.
    schemas, rows = [], 0
    for f in files:
        with fs.open(f, "rb") as fh:
            part = pq.ParquetFile(fh)
            rows += part.metadata.num_rows
            if not any(part.schema_arrow.equals(s) for s in schemas):  # one of each: the parts may be 10^5
                schemas.append(part.schema_arrow)
    dataset = pds.dataset(files, filesystem=fs, format="parquet", partitioning=pds.partitioning(flavor="hive"),
                          partition_base_dir=root)
    schema = pa.unify_schemas(schemas + [dataset.schema], promote_options="permissive")
    if "run" not in schema.names:
        schema = schema.append(pa.field("run", pa.string()))
    cols = list(dict.fromkeys([c for c in columns if c in schema.names] + ["run"])) if columns else schema.names
    return RunManifest(files, root, dataset.filesystem, dataset.partitioning, schema, cols, rows)


def read_run_manifest(dst: str, storage: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table | None:
    """Every manifest row of DST (all runs) as one table, with a `run` column; None when DST has no manifest.

    All rows in this process: for tests and small tools; `report` and `evaluate` use `latest_buckets`.
    """
    manifest = open_run_manifest(dst, storage, columns)
    if manifest is None:
        return None
    return pa.concat_tables([manifest.empty(), *manifest.batches()])


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


def latest_table(table: pa.Table, first: str | None = None) -> pa.Table:
    """latest_rows as a table, computed in Arrow/numpy (no Python object per row): per image_id the row with the
    latest finished_at (null: earliest), the last in manifest order among equals; images in order of first row.

    With `first`, a column of the rows' places in a larger table (in `table`'s order for each image), the
    images are in the order of their first row's place, and that column holds it: how a bucket of images
    keeps their order in the whole manifest."""
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
    firsts = np.minimum.reduceat(order, starts)
    if not first:
        return table.take(pa.array(last[np.argsort(firsts, kind="stable")]))
    places = table[first].to_numpy()[firsts]
    by_first = np.argsort(places, kind="stable")
    out = table.take(pa.array(last[by_first]))
    return out.set_column(out.schema.get_field_index(first), first, pa.array(places[by_first]))
