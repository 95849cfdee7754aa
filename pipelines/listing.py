"""What to process: a folder/prefix listed once, or a Parquet/text list of URIs."""

from __future__ import annotations

import datetime as dt
import io
import os
import posixpath
from collections import Counter
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.storage import StorageConfig, filesystem, is_local, is_remote, join, read_bytes, uri_of, write_bytes_atomic
from srmodel.seeds import image_id_from_uri

from .paths import IMAGE_EXTENSIONS, output_key

LISTING_SCHEMA = pa.schema([("image_id", pa.string()), ("src_uri", pa.string()), ("dst_key", pa.string())])


def _is_list_file(src: str) -> bool:
    return src.lower().endswith((".parquet", ".txt"))


def _key_for_uri(uri: str) -> str:
    """Output key for a listed URI: its host/bucket and path, so two buckets never collide."""
    parsed = urlparse(uri)
    return f"{parsed.netloc}/{parsed.path.lstrip('/')}" if parsed.netloc else parsed.path.lstrip("/")


def _from_list_file(src: str, storage: StorageConfig, fmt: str) -> pa.Table:
    data = read_bytes(src, storage)
    if src.lower().endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        col = next((c for c in ("src_uri", "uri", "path") if c in table.column_names), None)
        if col is None:
            raise ValueError(f"{src} needs a column named src_uri, uri or path; it has {table.column_names}")
        uris = [u for u in table.column(col).to_pylist() if u]
    else:
        uris = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip() and not line.startswith("#")]
    # Relative local paths would be resolved in each worker's own directory.
    uris = [u if "://" in u else "file://" + os.path.abspath(u) for u in uris]
    return _table(uris, [output_key(_key_for_uri(u), fmt) for u in uris])


def _from_folder(src: str, storage: StorageConfig, fmt: str, dst: str) -> pa.Table:
    fs, root = filesystem(src, storage)
    if not fs.isdir(root):
        raise FileNotFoundError(f"SRC {src} is not a folder/prefix of images (nor a .parquet/.txt list of URIs)")
    root = root.rstrip("/")
    _, dst_path = filesystem(dst, storage)
    inside = dst_path.rstrip("/") + "/"  # never take our own outputs as inputs when DST is under SRC
    paths = sorted(
        p for p in fs.find(root)
        if posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS and not p.startswith(inside)
    )
    uris = [uri_of(fs, p) if not is_local(fs) else "file://" + p for p in paths]
    keys = [output_key(p[len(root) + 1 :], fmt) for p in paths]
    return _table(uris, keys)


def _table(uris: list[str], keys: list[str]) -> pa.Table:
    """One row per distinct URI; output keys made unique (cat.jpg and cat.png must not share cat.png)."""
    seen: set[str] = set()
    rows = []
    for uri, key in zip(uris, keys):
        if uri not in seen:
            seen.add(uri)
            rows.append((image_id_from_uri(uri), uri, key))
    counts = Counter(key for _, _, key in rows)
    unique = [
        (iid, uri, _with_suffix(key, iid[:8]) if counts[key] > 1 else key) for iid, uri, key in rows
    ]
    return pa.table({name: [r[i] for r in unique] for i, name in enumerate(LISTING_SCHEMA.names)}, schema=LISTING_SCHEMA)


def _with_suffix(key: str, tag: str) -> str:
    stem, ext = posixpath.splitext(key)
    return f"{stem}-{tag}{ext}"


def listing_uri(dst: str) -> str:
    return join(dst, "_state", "listing.parquet")


def list_inputs(
    src: str, dst: str, storage: StorageConfig, fmt: str, *, save: bool = True, relist: bool | None = None
) -> tuple[pa.Table, bool]:
    """The job's inputs, and whether they came from the listing cached by an earlier run.

    A folder/prefix is listed once; the result is kept under DST/_state/ so a
    resumed run over a huge prefix does not list it again (`relist` forces a
    new listing, e.g. after adding files). List files are read every time.
    `relist=None`: local folders are listed every time (cheap, and new files
    are never missed); remote prefixes reuse the cached listing. The listing's
    schema metadata holds `listed_at` (UTC, ISO 8601) for the CLI's notice.
    """
    if relist is None:
        relist = not is_remote(src)
    if _is_list_file(src):
        return _from_list_file(src, storage, fmt), False
    cached = listing_uri(dst)
    fs, path = filesystem(cached, storage)
    if not relist and fs.exists(path):
        table = pq.read_table(io.BytesIO(fs.cat_file(path)))
        meta = table.schema.metadata or {}
        if meta.get(b"src") == src.encode() and meta.get(b"format") == fmt.encode():
            return table, True
    table = _from_folder(src, storage, fmt, dst)
    listed_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    table = table.replace_schema_metadata({"src": src, "format": fmt, "listed_at": listed_at})
    if not save:
        return table, False
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(cached, buf.getvalue(), storage)
    return table, False
