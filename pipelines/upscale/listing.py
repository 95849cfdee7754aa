"""What to process, planned as data: a sharded Parquet listing and the resume anti-join, both in Ray tasks.

The driver only splits SRC into work units (sub-folders, key ranges of a flat prefix, chunks of root files,
row groups of a Parquet list) and collects counts and byte offsets: its memory and time grow with the number
of tasks and buckets, never with the number of images.

    units --list tasks--> DST/_state/plan/<run>/list-i.arrow  (rows hashed by output key, see pieces.py)
    manifest parts --done tasks--> DST/_state/plan/<run>/done-i.arrow (ok image_ids of this params_hash)
    bucket k --plan task--> DST/_state/listing/<id>/part-k.parquet (cached listing)
                            DST/_state/todo/<run>/part-k.parquet   (listing minus done)

Buckets are keyed by the output key (dst_key): two URIs that would write the
same output (cat.jpg, cat.png -> cat.png) meet in one bucket, where they get
distinct keys; an `ok` manifest row's dst_uri gives its key, so the done set
is bucketed the same way without any global view.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster.storage import (StorageConfig, filesystem, is_local, is_s3, join, read_bytes, redact,
                             s3_key_pages, uri_of, write_bytes_atomic)
from srmodel.sampling.seeds import image_id_from_uri

from ..paths import IMAGE_EXTENSIONS, output_key
from .pieces import read_spans, write_piece

log = logging.getLogger(__name__)

LISTING_SCHEMA = pa.schema([("image_id", pa.string()), ("src_uri", pa.string()), ("dst_key", pa.string())])
MAX_BUCKETS = 4096  # also the cap of _auto_buckets (pieces.SUB_BUCKETS)
BUCKETING = 2  # listing.json's bucket rule: 2 = pieces.bucket_of (top bits of CRC-32); older listings are listed again
ROWS_PER_BUCKET = 250_000  # auto bucket count for Parquet lists: a bucket stays a few tens of MiB in a task


def _is_list_file(src: str) -> bool:
    return src.lower().endswith((".parquet", ".txt"))


def _key_for_uri(uri: str) -> str:
    """Output key for a listed URI: its host/bucket and path, so two buckets never collide."""
    parsed = urlparse(uri)
    return f"{parsed.netloc}/{parsed.path.lstrip('/')}" if parsed.netloc else parsed.path.lstrip("/")


# --- work units (driver side: one level of SRC, or Parquet metadata; never the whole listing) ---


def discover_units(src: str, dst: str, storage: StorageConfig, max_units: int) -> tuple[list[tuple], int | None]:
    """Units of listing work for SRC, and the row count when it is known up front (Parquet lists)."""
    if src.lower().endswith(".parquet"):
        fs, path = filesystem(src, storage)
        if not fs.exists(path):
            raise FileNotFoundError(f"list file {src} does not exist")
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        groups = list(range(meta.num_row_groups))
        per = max(1, -(-len(groups) // max_units))
        return [("parquet", src, groups[i : i + per]) for i in range(0, len(groups), per)], meta.num_rows
    if src.lower().endswith(".txt"):
        fs, path = filesystem(src, storage)
        if not fs.exists(path):
            raise FileNotFoundError(f"list file {src} does not exist")
        return [("text", src)], None  # text lists are read by one task; give large lists as Parquet
    fs, root = filesystem(src, storage)
    root = root.rstrip("/")
    # s3fs's isdir lists the whole level (10^8 keys of a flat prefix): one key of one request says as much.
    if not (_has_keys(fs, root) if is_s3(fs) else fs.isdir(root)):
        raise FileNotFoundError(f"SRC {src} is not a folder/prefix of images (nor a .parquet/.txt list of URIs)")
    if is_s3(fs):
        # Key ranges listed in parallel: a flat prefix of 10^8 keys is never listed by one task (nor twice).
        return [("keys", root, p, exact) for p, exact in split_prefix(fs, root, UNITS_PER_TASK * max_units)], None
    _, dst_path = filesystem(dst, storage)
    dst_path = dst_path.rstrip("/")
    # One level of SRC, streamed: sub-folders kept, files only noted (a flat folder's entries never pile up here).
    dirs, has_files = [], False
    for e in _entries(fs, root):
        name, is_dir = e
        if name == dst_path or name == root:  # never take our own outputs as inputs when DST is under SRC
            continue
        if is_dir:
            dirs.append(name)
        else:
            has_files = True
    units: list[tuple] = [("tree", d) for d in sorted(dirs)]
    # Files directly under SRC: one unit, listed by its task.
    return units + ([("files", root)] if has_files else []), None


def _entries(fs, root: str):
    """(path, is_folder) of one level of a folder: os.scandir when local (streamed), fs.ls otherwise."""
    if is_local(fs):
        with os.scandir(root) as it:
            for e in it:
                yield e.path, e.is_dir()
        return
    for e in fs.ls(root, detail=True):
        yield e["name"].rstrip("/"), e["type"] == "directory"
    fs.invalidate_cache()  # fsspec keeps listings in its dircache


UNITS_PER_TASK = 4  # key ranges per list task: ranges of uneven size still spread over the tasks
SPLIT_PAGE = 1000  # a key prefix whose first page (1,000 keys, one request) is complete is not split further
MAX_SPLIT_DEPTH = 64  # characters of key prefix (long shared name stems such as IMG_000... take a few)
_LAST_CHAR = "\U0010ffff"  # sorts after every other character (S3 orders keys by UTF-8 bytes: code points)


def _has_keys(fs, root: str) -> bool:
    bucket, _, key_root = root.partition("/")
    return bool(next(s3_key_pages(fs, bucket, key_root + "/" if key_root else "", page_size=1))[0])


def split_prefix(fs, root: str, target: int) -> list[tuple[str, bool]]:
    """Key prefixes, relative to root/, that cover every key under root/ once: (prefix, exact).

    Breadth first: a prefix whose first page of keys is truncated is split into one child per next
    character (found by skipping: one 1-key request per child), until about `target` prefixes or all
    small. `exact` marks a key that equals its prefix (root/cat.png beside root/cat.png.old): a unit of
    that one key, as the prefix's children do not hold it. Requests run 16 at a time.
    """
    bucket, _, key_root = root.partition("/")
    base = key_root + "/" if key_root else ""
    skip = len(bucket) + 1 + len(base)

    def complete(p: str) -> bool:
        return not next(s3_key_pages(fs, bucket, base + p, page_size=SPLIT_PAGE))[1]

    def children(p: str) -> tuple[list[str], bool]:
        kids, exact, after = [], False, None
        while True:
            keys, _ = next(s3_key_pages(fs, bucket, base + p, start_after=after, page_size=1))
            if not keys:
                return kids, exact
            rest = keys[0][skip + len(p):]
            if not rest or (kids and kids[-1] == p + rest[0]):  # the key itself, or a name holding _LAST_CHAR
                exact = exact or not rest
                after = keys[0][len(bucket) + 1:]
                continue
            kids.append(p + rest[0])
            after = base + kids[-1] + _LAST_CHAR

    units, frontier = [], [""]
    with ThreadPoolExecutor(16) as pool:
        for _ in range(MAX_SPLIT_DEPTH):
            if not frontier or len(units) + len(frontier) >= target:
                break
            small = list(pool.map(complete, frontier))
            units += [(p, False) for p, done in zip(frontier, small) if done]
            big = [p for p, done in zip(frontier, small) if not done]
            frontier = []
            for p, (kids, exact) in zip(big, pool.map(children, big)):
                frontier += kids
                if exact:
                    units.append((p, True))
    return sorted(units + [(p, False) for p in frontier])


def group_units(units: list[tuple], tasks: int) -> list[list[tuple]]:
    """At most `tasks` groups, round-robin (sub-folders of similar size spread over tasks)."""
    n = max(1, min(tasks, len(units)))
    return [units[i::n] for i in range(n)] if units else []


PIECE_ROWS = 500_000  # rows a list task holds before storing them as a piece (a flat folder may hold 10^8)


def _rows_of_unit(unit: tuple, ctx: dict) -> tuple[list[str], list[str]]:
    """(URIs, output keys before de-duplication) of one unit, all at once (small tools and tests)."""
    uris, keys = [], []
    for u, k in _chunks_of_unit(unit, ctx, None):
        uris += u
        keys += k
    return uris, keys


def _chunks_of_unit(unit: tuple, ctx: dict, rows: int | None):
    """(URIs, output keys before de-duplication) of one unit, `rows` at a time (None: one chunk): a flat folder
    or key range is read entry by entry / page by page, never held whole."""
    storage = StorageConfig.model_validate(ctx["storage"])
    fmt = ctx["format"]
    kind = unit[0]
    if kind in ("tree", "files", "keys"):
        fs, root = filesystem(ctx["src"], storage)
        root = root.rstrip("/")
        inside = ctx["dst_path"].rstrip("/") + "/"
        if kind == "tree":
            paths = iter(fs.find(unit[1]))
        elif kind == "files":
            paths = (name for name, is_dir in _entries(fs, unit[1]) if not is_dir)
        else:  # a key range of an S3 prefix, page by page (keys only)
            bucket, _, key_root = root.partition("/")
            prefix = (key_root + "/" if key_root else "") + unit[2]
            exact = unit[3]  # the one key equal to the prefix, seen when it was split
            paths = iter([f"{bucket}/{prefix}"]) if exact else (k for keys, _ in s3_key_pages(fs, bucket, prefix)
                                                                  for k in keys)
        chunk = []
        for path in paths:
            if posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS and not path.startswith(inside):
                chunk.append(path)
                if rows and len(chunk) >= rows:
                    yield _uris_and_keys(fs, root, sorted(chunk), fmt)
                    chunk = []
        fs.invalidate_cache()
        if chunk or not rows:
            yield _uris_and_keys(fs, root, sorted(chunk), fmt)
        return
    yield _listed_rows(unit, storage, fmt, ctx)


def _uris_and_keys(fs, root: str, paths: list[str], fmt: str) -> tuple[list[str], list[str]]:
    uris = ["file://" + p for p in paths] if is_local(fs) else [uri_of(fs, p) for p in paths]
    return uris, [output_key(p[len(root) + 1 :], fmt) for p in paths]


def _listed_rows(unit: tuple, storage: StorageConfig, fmt: str, ctx: dict) -> tuple[list[str], list[str]]:
    """The rows of a list SRC's unit: a Parquet file's row groups or a text file."""
    kind = unit[0]
    if kind == "parquet":
        fs, path = filesystem(unit[1], storage)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            col = next((c for c in ("src_uri", "uri", "path") if c in names), None)
            if col is None and {"bucket", "key"} <= set(names):  # an S3 Inventory report
                t = pf.read_row_groups(unit[2], columns=["bucket", "key"])
                raw = [f"s3://{b}/{k}" for b, k in zip(t.column("bucket").to_pylist(), t.column("key").to_pylist())]
            elif col is None:
                raise ValueError(f"{unit[1]} needs a column named src_uri, uri or path (or bucket and key); it has {names}")
            else:
                raw = pf.read_row_groups(unit[2], columns=[col]).column(col).to_pylist()
    else:
        data = read_bytes(unit[1], storage)
        raw = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip() and not line.startswith("#")]
    # Relative local paths are resolved against the driver's directory, not each worker's.
    uris = [u if "://" in u else "file://" + os.path.normpath(os.path.join(ctx["cwd"], u)) for u in raw if u]
    # user:password@ never reaches the manifest; the read stage refuses the redacted row (source_policy).
    uris = [redact(u) for u in uris]
    return uris, [output_key(_key_for_uri(u), fmt) for u in uris]


def _listing_rows(units: list[tuple], ctx: dict) -> pa.Table:
    uris, keys = [], []
    for unit in units:
        u, k = _rows_of_unit(unit, ctx)
        uris += u
        keys += k
    return pa.table({"image_id": [image_id_from_uri(u) for u in uris], "src_uri": uris, "dst_key": keys},
                    schema=LISTING_SCHEMA)


def list_pieces(units: list[tuple], ctx: dict, uri: str, buckets: int | None,
                piece_rows: int = PIECE_ROWS) -> list[tuple[str, dict]]:
    """(Ray task) Rows of some units, stored as pieces bucketed by output key, a piece per `piece_rows` rows
    (`uri` with -0000, -0001... before its extension): a task's memory is one piece's, whatever its units hold.
    Returns (uri, counts and offsets) of each piece."""
    storage = StorageConfig.model_validate(ctx["storage"])
    stem, ext = posixpath.splitext(uri)
    out, uris, keys = [], [], []

    def store():
        table = pa.table({"image_id": [image_id_from_uri(u) for u in uris], "src_uri": uris, "dst_key": keys},
                         schema=LISTING_SCHEMA)
        piece_uri = f"{stem}-{len(out):04d}{ext}"
        out.append((piece_uri, write_piece(piece_uri, table, keys, storage, buckets)))
        uris.clear()
        keys.clear()

    for unit in units:
        for u, k in _chunks_of_unit(unit, ctx, piece_rows):
            if uris and len(uris) + len(u) > piece_rows:
                store()
            uris += u
            keys += k
    if uris or not out:
        store()
    return out


def merge_bucket(tables: list[pa.Table]) -> pa.Table:
    """One bucket's listing: one row per distinct URI, output keys made unique (cat.jpg and cat.png)."""
    table = pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()
    if not len(table):
        return table
    table = table.sort_by("src_uri")
    uris = table.column("src_uri").to_pylist()
    keep = [i for i in range(len(uris)) if i == 0 or uris[i] != uris[i - 1]]
    table = table.take(pa.array(keep, pa.int64()))
    counts = pc.value_counts(table.column("dst_key")).to_pylist()
    clashes = {c["values"] for c in counts if c["counts"] > 1}
    if clashes:
        keys = [_with_suffix(k, iid[:8]) if k in clashes else k
                for k, iid in zip(table.column("dst_key").to_pylist(), table.column("image_id").to_pylist())]
        table = table.set_column(2, "dst_key", pa.array(keys, pa.string()))
    return table


def _with_suffix(key: str, tag: str) -> str:
    stem, ext = posixpath.splitext(key)
    return f"{stem}-{tag}{ext}"


def bucket_key(dst_key: str, image_id: str) -> str:
    """The key an output was bucketed by: a clash suffix (added after bucketing, see merge_bucket) removed."""
    stem, ext = posixpath.splitext(dst_key)
    tag = f"-{image_id[:8]}"
    return stem[: -len(tag)] + ext if image_id and stem.endswith(tag) else dst_key


def read_parquet_uri(uri: str, storage: StorageConfig, columns: list[str] | None = None) -> pa.Table:
    """A whole (small) Parquet file in one GET: a body cut mid-stream is re-fetched by read_bytes."""
    return pq.read_table(io.BytesIO(read_bytes(uri, storage)), columns=columns)


def write_parquet_uri(uri: str, table: pa.Table, storage: StorageConfig) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(uri, buf.getvalue(), storage)


def read_todo(batch: dict, *, storage: dict, rows_per_block: int):
    """A Ray Data task: the todo shards named in `batch["uri"]`, yielded in blocks of `rows_per_block` rows.

    Read here with the store's own retries (read_parquet_uri re-fetches a body cut mid-stream), not by
    ray.data.read_parquet: that lists and samples the shards on the driver through s3fs, where one faulty
    response ended a run (`no files found under [...]`, or a cut body while inferring the schema).
    """
    cfg = StorageConfig.model_validate(storage)
    for uri in batch["uri"]:
        for chunk in read_parquet_uri(str(uri), cfg).to_batches(max_chunksize=rows_per_block):
            yield pa.Table.from_batches([chunk])


DONE_SCHEMA = pa.schema([("image_id", pa.string())])


def plan_bucket(k: int, buckets: int, spec: dict, lists: list[tuple], dones: list[tuple]) -> dict:
    """Bucket k: its listing (from the list pieces or the cached part), minus the done image_ids.

    `lists`/`dones`: (uri, start, end) byte ranges of the pieces that hold rows of bucket k.
    """
    storage = StorageConfig.model_validate(spec["storage"])
    if spec.get("listing_in"):
        listing = read_parquet_uri(spec["listing_in"], storage)
    else:
        listing = merge_bucket([read_spans(lists, LISTING_SCHEMA, storage, k, buckets)])
    if spec.get("listing_out"):
        write_parquet_uri(spec["listing_out"], listing, storage)
    done = read_spans(dones, DONE_SCHEMA, storage, k, buckets).column("image_id")
    todo = listing
    if len(done):
        todo = listing.filter(pc.invert(pc.is_in(listing.column("image_id"), value_set=pc.unique(done))))
    written = None
    if spec.get("todo_out") and len(todo):
        write_parquet_uri(spec["todo_out"], todo, storage)
        written = spec["todo_out"]
    return {"bucket": k, "listed": len(listing), "todo": len(todo), "todo_uri": written,
            "sample": todo.column("src_uri").slice(0, 5).to_pylist()}


# --- the cached listing of a folder/prefix SRC ---


def listing_meta_uri(dst: str) -> str:
    return join(dst, "_state", "listing.json")


def read_listing_meta(dst: str, storage: StorageConfig) -> dict | None:
    fs, path = filesystem(listing_meta_uri(dst), storage)
    if not fs.exists(path):
        return None
    try:
        meta = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None  # unreadable: list again
    problem = listing_meta_problem(meta)
    if problem:
        # DST is shared storage: its state is data, never trusted as paths (the id names a folder to delete).
        log.warning("ignoring %s (%s): listing again", uri_of(fs, path), problem)
        return None
    return meta


LISTING_ID = re.compile(r"^[0-9a-f]{12}$")


def listing_meta_problem(meta) -> str | None:
    """Why a listing.json read back from DST cannot be used, or None when every value is in range."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    if not isinstance(meta.get("listing_id"), str) or not LISTING_ID.match(meta["listing_id"]):
        return f"listing_id {meta.get('listing_id')!r} is not 12 hex digits"
    buckets = meta.get("buckets")
    if not isinstance(buckets, int) or isinstance(buckets, bool) or not 1 <= buckets <= MAX_BUCKETS:
        return f"buckets {buckets!r} is not a whole number from 1 to {MAX_BUCKETS}"
    images = meta.get("images")
    if images is not None and (not isinstance(images, int) or isinstance(images, bool) or images < 0):
        return f"images {images!r} is not a count"
    return None


def new_listing_id() -> str:
    return uuid.uuid4().hex[:12]


def listing_part_uri(dst: str, listing_id: str, k: int) -> str:
    return join(dst, "_state", "listing", listing_id, f"part-{k:05d}.parquet")


def commit_listing(dst: str, storage: StorageConfig, meta: dict, previous: dict | None) -> None:
    """The meta file is the commit point: written after every part; an older listing is removed after it."""
    write_bytes_atomic(listing_meta_uri(dst), json.dumps(meta).encode(), storage)
    old_id = str((previous or {}).get("listing_id") or "")
    if LISTING_ID.match(old_id) and old_id != meta["listing_id"]:  # never a path taken from DST as it was read
        fs, path = filesystem(join(dst, "_state", "listing", old_id), storage)
        try:
            fs.rm(path, recursive=True)
        except (OSError, FileNotFoundError):
            pass  # a stale listing costs space, never correctness


def list_inputs(src: str, dst: str, storage: StorageConfig, fmt: str) -> pa.Table:
    """The whole listing in this process (benchmarks and small tools; jobs plan with Ray tasks)."""
    _, dst_path = filesystem(dst, storage)
    ctx = {"src": src, "dst_path": dst_path, "format": fmt, "storage": storage.model_dump(mode="json"), "cwd": os.getcwd()}
    units, _ = discover_units(src, dst, storage, max_units=1)
    return merge_bucket([_listing_rows(units, ctx)]).sort_by("src_uri")
