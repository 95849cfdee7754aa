"""What a run left, as `ugcsr report` shows it: settings, counts, timings, errors, metrics, gallery picks.

Plain data only (dataclasses, dicts, lists, numpy arrays), no HTML: `render`
draws it. Aggregates over manifest rows are pyarrow compute; Python loops are
left for groups, files, the join of outputs with evaluate's rows, and the few
rows the gallery shows.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster.storage import StorageConfig, filesystem, is_local, join

from ..upscale.outputs import latest_table, read_run_manifest, read_run_summary
from .scope import OutOfScope, ReadScope, src_root

STAGES = ("decode", "semantic", "sr", "encode")
# What the page uses of the manifest (prompts and tags stay on disk: the driver holds every row read).
MANIFEST_COLUMNS = ["image_id", "src_uri", "status", "stage", "error_type", "error_message", "dst_uri", "params_hash",
                    "model_id", "node_id", "timings_ms", "finished_at", "run"]


# ---------------------------------------------------------------- upscale runs

@dataclass
class ErrorGroup:
    """Images in error with the same stage and error type (the latest row of each image)."""

    stage: str
    error_type: str
    images: int
    messages: list[str]  # the first 3 distinct messages, whole
    inputs: list[str]  # the first 5 inputs


@dataclass
class GalleryItem:
    row: dict  # the image's latest manifest row
    ev_row: dict | None  # its evaluate row, when evaluated
    why: str  # why it is shown ("sample", "lowest PSNR")


@dataclass
class GalleryGroup:
    title: str
    gid: str  # names the gallery on the page (`gallery-<gid>`) and its files
    items: list[GalleryItem]


@dataclass
class UpscaleRun:
    dst: str
    settings: list[tuple[str, object]]  # (setting, value), those with a value
    counts: list[list]  # [status, images (latest row each), manifest rows (all runs)], then the totals
    throughput: dict[str, np.ndarray]  # run -> seconds since its first row, one per finished row, ascending
    stage_ms: dict[str, np.ndarray]  # stage -> ms per image (rows that timed it), in STAGES order
    stage_stats: list[list]  # [stage, images, mean ms, p50 ms, p95 ms]
    errors: list[ErrorGroup]  # most images first
    evaluation: Evaluation | None
    gallery: list[GalleryGroup]  # those with items
    src: str | None  # SRC as the run recorded it (summary.json, else _state/listing.json); None if unknown
    scope: ReadScope  # what the gallery may read: under DST and SRC (a list file's folder), never elsewhere


def load_upscale_run(dst: str, storage: StorageConfig, *, eval_dir: str | None, gallery: int,
                     per_page: int) -> UpscaleRun | None:
    """Everything the page shows of an upscale DST; None when DST has no manifest."""
    manifest = read_run_manifest(dst, storage, columns=MANIFEST_COLUMNS)
    if manifest is None:
        return None
    evaluation = load_evaluation(dst, eval_dir, storage)
    # latest_table is the one definition of "an image's state" (evaluate uses it too), computed in Arrow.
    latest = latest_table(manifest)
    summary = read_run_summary(dst, storage) or {}
    src = _recorded_src(dst, summary, storage)
    stage_ms = _stage_ms(manifest)
    return UpscaleRun(
        dst=dst, settings=_settings(dst, manifest, summary), counts=_counts(manifest, latest),
        throughput=_throughput(manifest), stage_ms=stage_ms,
        stage_stats=[[s, len(v), float(np.mean(v)), float(np.percentile(v, 50)), float(np.percentile(v, 95))]
                     for s, v in stage_ms.items()],
        errors=_errors(latest), evaluation=evaluation, gallery=_gallery(latest, evaluation, gallery, per_page),
        src=src, scope=ReadScope.of(dst, src_root(src)))


def _recorded_src(dst: str, summary: dict, storage: StorageConfig) -> str | None:
    """The run's SRC: the summary's, else the listing's (a run killed before its summary still has one)."""
    src = summary.get("src") if isinstance(summary, dict) else None
    if isinstance(src, str) and src:
        return src
    fs, path = filesystem(join(dst, "_state", "listing.json"), storage)
    try:
        meta = json.loads(fs.cat_file(path)) if fs.isfile(path) else None
    except (OSError, ValueError):
        return None
    src = meta.get("src") if isinstance(meta, dict) else None
    return src if isinstance(src, str) and src else None


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    """The column, or nulls where this manifest's version did not write it (as a missing key reads)."""
    if name in table.column_names:
        return table[name]
    return pa.chunked_array([pa.nulls(len(table), pa.string())])


def _or(values, default: str):
    """`value or default` per element: null and "" become default."""
    return pc.if_else(pc.fill_null(pc.not_equal(values, ""), False), values, default)


def _value_counts(values) -> dict:
    """value -> rows, nulls included (as None), in order of first appearance."""
    counts = pc.value_counts(values)
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


def _settings(dst: str, manifest: pa.Table, summary: dict) -> list[tuple[str, object]]:
    def distinct(col):
        counts = pc.value_counts(pc.drop_null(_column(manifest, col)))
        # most rows first; the sort is stable, so ties stay in order of first appearance (as Counter.most_common)
        top = counts.take(pc.array_sort_indices(counts.field("counts"), order="descending")[:5])
        return ", ".join(f"{k} ({n} rows)" for k, n in zip(top.field("values").to_pylist(),
                                                            top.field("counts").to_pylist())) or None

    items = [("DST", dst), ("SRC", summary.get("src")), ("preset", summary.get("preset")),
             ("params_hash", distinct("params_hash")), ("model_id", distinct("model_id")),
             ("runs", distinct("run")), ("nodes", distinct("node_id")),
             ("images in the last run's plan", summary.get("images")),
             ("last run wall time (s)", summary.get("wall_s")), ("last run images/s", summary.get("images_per_s")),
             ("pools", summary.get("pools"))]
    return [(k, v) for k, v in items if v not in (None, "", {})]


def _counts(manifest: pa.Table, latest: pa.Table) -> list[list]:
    now, every = _value_counts(_column(latest, "status")), _value_counts(_column(manifest, "status"))
    statuses = sorted(set(now) | set(every), key=str)
    return [[s, now.get(s, 0), every.get(s, 0)] for s in statuses] + [["total", len(latest), len(manifest)]]


def _throughput(manifest: pa.Table) -> dict[str, np.ndarray]:
    finished = _column(manifest, "finished_at")
    if not pa.types.is_timestamp(finished.type):
        return {}
    timed = pa.table({"run": _or(_column(manifest, "run"), "run"), "at": finished}).filter(pc.is_valid(finished))
    timed = timed.take(pc.sort_indices(timed["at"]))  # stable: rows at the same time stay in manifest order
    per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[finished.type.unit]
    # use_threads=False keeps runs and each run's times in the (sorted) input order
    grouped = timed.group_by("run", use_threads=False).aggregate([("at", "list")])
    out = {}
    for run, times in zip(grouped["run"].to_pylist(), grouped["at_list"]):
        ticks = times.values.cast(pa.int64()).to_numpy()
        out[run] = (ticks - ticks[0]) / per_second  # exact ticks, one division: as timedelta.total_seconds()
    return out


def _stage_ms(manifest: pa.Table) -> dict[str, np.ndarray]:
    timings = _column(manifest, "timings_ms")
    if not pa.types.is_struct(timings.type):
        return {}
    names = {timings.type.field(i).name for i in range(timings.type.num_fields)}
    out = {}
    for s in STAGES:
        if s not in names:
            continue
        ms = pc.struct_field(timings, s)  # null where the row has no timings
        ms = ms.filter(pc.not_equal(ms, 0))  # a stage that took 0 ms (or was not timed) is not a sample
        if len(ms):
            out[s] = ms.to_numpy()
    return out


def _errors(latest: pa.Table) -> list[ErrorGroup]:
    failed = latest.filter(pc.fill_null(pc.equal(_column(latest, "status"), "error"), False))
    keys = pa.table({"stage": _or(_column(failed, "stage"), "?"), "error_type": _or(_column(failed, "error_type"), "?"),
                     "message": pc.fill_null(_column(failed, "error_message"), ""),
                     "input": pc.fill_null(_column(failed, "src_uri"), "")})
    grouped = keys.group_by(["stage", "error_type"], use_threads=False).aggregate([("message", "list"),
                                                                                   ("input", "list")])
    groups = [ErrorGroup(g["stage"], g["error_type"], len(g["input_list"]),
                         list(dict.fromkeys(g["message_list"]))[:3], g["input_list"][:5])
              for g in grouped.to_pylist()]
    return sorted(groups, key=lambda g: -g.images)  # stable: equal sizes stay in order of first appearance


# ---------------------------------------------------------------- evaluation

@dataclass
class Evaluation:
    """An `ugcsr evaluate` output: its summary.json as the page words it, and its per-image rows."""

    dir: str
    sr: object
    gt: object
    protocol: str
    means: list[list]  # [metric, mean, why it is missing]
    counts: list[list]  # [count, value], then [errors: <type>, images]
    score: object
    score_note: str
    comparison: dict | None  # {dataset, columns, rows: [method, *values], note}
    rows: list[dict]  # metrics.parquet
    psnr: np.ndarray  # the finite per-image PSNRs (the histogram)


def load_evaluation(dst: str, eval_dir: str | None, storage: StorageConfig) -> Evaluation | None:
    """The evaluate output at eval_dir (an error if it has none) or DST/_eval (None if it has none)."""
    folder = eval_dir or join(dst, "_eval")
    fs, path = filesystem(join(folder, "summary.json"), storage)
    if not fs.exists(path):
        if eval_dir:
            raise FileNotFoundError(f"--eval {eval_dir} holds no summary.json; run `ugcsr evaluate` first")
        return None
    import pyarrow.parquet as pq

    s = json.loads(fs.cat_file(path))
    mfs, mpath = filesystem(join(folder, "metrics.parquet"), storage)
    table = pq.read_table(io.BytesIO(mfs.cat_file(mpath))) if mfs.exists(mpath) else pa.table({})
    means, missing = s.get("means", {}), s.get("missing", {})
    comparison = None
    if s.get("comparison"):
        comp, cols = s["comparison"], ["psnr", "ssim", "lpips", "musiq", "maniqa", "clipiqa"]
        comparison = {"dataset": comp["dataset"], "columns": cols, "note": comp.get("note", ""),
                      "rows": [[r["method"]] + [r.get(c) for c in cols] for r in comp["rows"]]}
    psnr = table["psnr"] if "psnr" in table.column_names else pa.chunked_array([], pa.float64())
    if not (pa.types.is_floating(psnr.type) or pa.types.is_integer(psnr.type)):  # e.g. an all-null column
        psnr = pa.chunked_array([], pa.float64())
    return Evaluation(
        dir=folder, sr=s.get("sr"), gt=s.get("gt"), protocol=s.get("protocol", {}).get("psnr_ssim", ""),
        means=[[m, means.get(m), missing.get(m)] for m in means],
        counts=[[k, v] for k, v in s.get("counts", {}).items()]
        + [[f"errors: {k}", v] for k, v in s.get("by_error_type", {}).items()],
        score=s.get("score"), score_note=s.get("score_note", ""), comparison=comparison,
        rows=table.to_pylist(), psnr=psnr.filter(pc.is_finite(psnr)).to_numpy().astype(float))


# ---------------------------------------------------------------- gallery

def path_of(uri: str) -> str:
    """A URI as evaluate and the manifest may both spell it (file:// or not)."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _gallery(latest: pa.Table, ev: Evaluation | None, gallery: int, per_page: int) -> list[GalleryGroup]:
    status, dst_uri = _column(latest, "status"), _column(latest, "dst_uri")
    ok = latest.filter(pc.and_(pc.equal(status, "ok"), pc.not_equal(dst_uri, "")))  # nulls drop out
    by_dst = {path_of(r["sr_uri"]): r for r in (ev.rows if ev else []) if r.get("sr_uri")}
    worst = []
    if ev:
        dsts = [path_of(u) for u in ok["dst_uri"].to_pylist()]
        scored = [i for i, p in enumerate(dsts) if p in by_dst and by_dst[p].get("psnr") is not None]
        scored.sort(key=lambda i: by_dst[dsts[i]]["psnr"])  # stable, as the run's rows: ties keep that order
        worst = _rows(ok, scored[:min(per_page, max(1, gallery // 3))])
    groups = [GalleryGroup("Lowest PSNR", "worst", [GalleryItem(r, by_dst.get(path_of(r["dst_uri"])), "lowest PSNR")
                                                    for r in worst]),
              GalleryGroup("Sample", "sample", [GalleryItem(r, by_dst.get(path_of(r["dst_uri"])), "sample")
                                                for r in _sample(ok, gallery)])]
    return [g for g in groups if g.items]


def _sample(rows: pa.Table, n: int) -> list[dict]:
    """n rows spread evenly over the run, in a stable order (by image_id), never all of a huge run."""
    rows = rows.take(pc.sort_indices(rows["image_id"]))
    if len(rows) <= n:
        return rows.to_pylist()
    idx = np.linspace(0, len(rows) - 1, n).round().astype(int)
    return _rows(rows, list(dict.fromkeys(idx.tolist())))


def _rows(table: pa.Table, indices: list[int]) -> list[dict]:
    return table.take(pa.array(indices, pa.int64())).to_pylist()  # typed: an empty list alone reads as nulls


# ---------------------------------------------------------------- training runs

@dataclass
class Metrics:
    """metrics.parquet of a training run, as the loss plot needs it."""

    columns: list[str]
    x: str | None  # the x axis column ("step"), None for the row number
    steps: np.ndarray
    losses: dict[str, np.ndarray]  # column -> values (NaN where null); empty when no numeric column
    last: dict[str, object]  # numeric column -> its last value


@dataclass
class TrainingRun:
    run: str
    settings: tuple[str, dict] | None  # (the file it came from, its settings)
    metrics: Metrics | None  # None when the run has no metrics.parquet
    validation: dict[str, list[str]]  # checkpoint -> its validation images (paths), checkpoints in natural order
    read: Callable[[str], bytes]  # the bytes of one of those paths


def is_training_run(run: str, storage: StorageConfig) -> bool:
    fs, root = filesystem(run, storage)
    if not fs.isdir(root):
        return False
    return fs.exists(root.rstrip("/") + "/metrics.parquet") or bool(fs.glob(root.rstrip("/") + "/checkpoint*"))


def load_training_run(run: str, storage: StorageConfig) -> TrainingRun:
    import pyarrow.parquet as pq

    fs, root = filesystem(run, storage)
    root = root.rstrip("/")
    settings = None
    for name in ("config.json", "train_config.json", "run.json", "summary.json"):
        if fs.exists(f"{root}/{name}"):
            try:
                data = json.loads(fs.cat_file(f"{root}/{name}"))
            except ValueError:
                continue
            settings = (name, data if isinstance(data, dict) else {"value": data})
            break
    metrics = None
    if fs.exists(f"{root}/metrics.parquet"):
        metrics = _metrics(pq.read_table(io.BytesIO(fs.cat_file(f"{root}/metrics.parquet"))))
    images = sorted(p for p in fs.find(root) if p.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))
                    and any("val" in part.lower() for part in p[len(root) + 1:].split("/")))
    groups: dict[str, list[str]] = {}
    for p in images:
        rel = p[len(root) + 1:]
        ckpt = next((part for part in rel.split("/") if re.match(r"(checkpoint|step|ckpt|epoch)[-_=]?\d+", part, re.I)),
                    posixpath.dirname(rel) or ".")
        groups.setdefault(ckpt, []).append(p)
    return TrainingRun(run=run, settings=settings, metrics=metrics,
                       validation={k: groups[k] for k in sorted(groups, key=_natural)}, read=_reader(fs, root))


def _reader(fs, root: str) -> Callable[[str], bytes]:
    """fs.cat_file, refusing a local file whose realpath leaves the run folder (a symlink to elsewhere)."""
    if not is_local(fs):
        return fs.cat_file  # object keys found under the prefix are under it
    scope = ReadScope.of(root)

    def read(path: str) -> bytes:
        if not scope.allows(path):
            raise OutOfScope("not under the run folder")
        return fs.cat_file(path)

    return read


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _metrics(table: pa.Table) -> Metrics:
    cols = table.column_names
    x = "step" if "step" in cols else None
    numeric = [c for c in cols if c != x and str(table.schema.field(c).type) in ("double", "float", "int64", "int32")]
    losses = [c for c in numeric if "loss" in c.lower()] or numeric[:1]
    if not losses:  # nothing to plot: the page names the columns instead
        return Metrics(columns=cols, x=x, steps=np.zeros(0), losses={}, last={})
    return Metrics(columns=cols, x=x, steps=_floats(table[x]) if x else np.arange(len(table), dtype=float),
                   losses={c: _floats(table[c]) for c in losses},
                   last={c: table[c][len(table) - 1].as_py() for c in numeric})


def _floats(values: pa.ChunkedArray) -> np.ndarray:
    """float64 with NaN for nulls (as np.asarray(to_pylist(), dtype=float) would give)."""
    return pc.fill_null(pc.cast(values, pa.float64(), safe=False), float("nan")).to_numpy()
