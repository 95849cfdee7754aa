"""What a run left, as `ugcsr report` shows it: settings, counts, timings, errors, metrics, gallery picks.

Plain data only (dataclasses, dicts, lists, numpy arrays), no HTML: `render`
draws it. The manifest streams through tallies (`_AllRows`, `_LatestRows`) in
bounded memory, whatever its size; aggregates over rows are pyarrow compute,
Python loops are left for groups, files, the join of outputs with evaluate's
rows, and the few rows the gallery shows.
"""

from __future__ import annotations

import heapq
import io
import json
import posixpath
import re
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster.storage import StorageConfig, filesystem, is_local, join

from ..upscale.outputs import open_run_manifest, read_run_summary
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
    throughput: dict[str, np.ndarray]  # run -> seconds since its first row, ascending: each finished row, or a sample
    finished: dict[str, int]  # run -> its rows with a finished_at (what each throughput sample stands for)
    stage_ms: dict[str, np.ndarray]  # stage -> ms per image (rows that timed it, or a sample), in STAGES order
    stage_stats: list[list]  # [stage, images, mean ms, p50 ms, p95 ms]: images and mean exact, percentiles of stage_ms
    errors: list[ErrorGroup]  # most images first
    evaluation: Evaluation | None
    gallery: list[GalleryGroup]  # those with items
    src: str | None  # SRC as the run recorded it (summary.json, else _state/listing.json); None if unknown
    scope: ReadScope  # what the gallery may read: under DST and SRC (a list file's folder), never elsewhere


def load_upscale_run(dst: str, storage: StorageConfig, *, eval_dir: str | None, gallery: int,
                     per_page: int, bucket_rows: int | None = None) -> UpscaleRun | None:
    """Everything the page shows of an upscale DST; None when DST has no manifest.

    Bounded memory whatever the manifest's size: its rows stream through `_AllRows` and, bucket by bucket of
    images, their latest rows through `_LatestRows` (`RunManifest.latest_buckets`); only tallies are kept.
    """
    manifest = open_run_manifest(dst, storage, columns=MANIFEST_COLUMNS)
    if manifest is None:
        return None
    evaluation = load_evaluation(dst, eval_dir, storage)
    summary = read_run_summary(dst, storage) or {}
    src = _recorded_src(dst, summary, storage)
    every, latest = _AllRows(manifest.schema), _LatestRows(evaluation, gallery, per_page)
    # latest_table (in latest_buckets) is the one definition of "an image's state" (evaluate uses it too).
    for bucket in manifest.latest_buckets(on_rows=every.add, bucket_rows=bucket_rows):
        latest.add(bucket)
    stages = {s: every.stages[s] for s in STAGES if s in every.stages}
    return UpscaleRun(
        dst=dst, settings=_settings(dst, every, summary), counts=_counts(every, latest),
        throughput=every.throughput(), finished={run: t.rows for run, t in every.times.items()},
        stage_ms={s: t.sample.values() for s, t in stages.items()}, stage_stats=[t.stats(s) for s, t in stages.items()],
        errors=latest.errors(), evaluation=evaluation, gallery=latest.gallery(), src=src,
        scope=ReadScope.of(dst, src_root(src)))


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


def _add_counts(into: dict, values) -> None:
    """into[value] += rows, nulls included (as None); new values in order of first appearance."""
    counts = pc.value_counts(values)
    for value, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
        into[value] = into.get(value, 0) + n


# ---------------------------------------------------------------- tallies over the manifest

SAMPLE = 20_000  # values kept per plotted series (a run's finish times, a stage's ms); all of them up to this


class _Sample:
    """A uniform sample without replacement of at most `size` values of a stream, in stream order.

    Each value gets a random key from its own seeded generator and the `size` smallest keys stay: the same
    stream gives the same sample, and a stream of at most `size` values is kept whole.
    """

    def __init__(self, name: str, dtype, size: int = SAMPLE):
        self.size, self.rng = size, np.random.default_rng(zlib.crc32(name.encode()))
        self.keys, self.kept = np.zeros(0), np.zeros(0, dtype)

    def add(self, values: np.ndarray) -> None:
        self.keys = np.concatenate([self.keys, self.rng.random(len(values))])
        self.kept = np.concatenate([self.kept, values])
        if len(self.keys) >= 2 * self.size:  # trimmed now and then: amortised O(1) per value
            self._trim()

    def values(self) -> np.ndarray:
        self._trim()
        return self.kept

    def _trim(self) -> None:
        if len(self.keys) > self.size:
            keep = np.sort(np.argpartition(self.keys, self.size - 1)[:self.size])
            self.keys, self.kept = self.keys[keep], self.kept[keep]


@dataclass
class _Times:
    """One run's finished_at ticks: how many, the first (tick, manifest row) and a sample."""

    sample: _Sample
    rows: int = 0
    first: tuple[int, int] = (np.iinfo(np.int64).max, 0)


@dataclass
class _Stage:
    """One stage's ms per image: count and sum exact, a sample for the plot and the percentiles."""

    sample: _Sample
    n: int = 0
    total: float = 0.0

    def stats(self, stage: str) -> list:
        v = self.sample.values()
        mean = float(np.mean(v)) if len(v) == self.n else self.total / self.n  # every value kept: their np.mean
        return [stage, self.n, mean, float(np.percentile(v, 50)), float(np.percentile(v, 95))]


class _AllRows:
    """Tallies over every manifest row (all runs), fed chunk by chunk: counts exact, plot series sampled."""

    def __init__(self, schema: pa.Schema):
        self.rows, self.status = 0, {}
        self.distinct = {c: {} for c in ("params_hash", "model_id", "run", "node_id")}
        at = schema.field("finished_at").type if "finished_at" in schema.names else None
        self.unit = at.unit if at is not None and pa.types.is_timestamp(at) else None
        self.times: dict[str, _Times] = {}
        self.stages: dict[str, _Stage] = {}

    def add(self, chunk: pa.Table) -> None:
        self.rows += len(chunk)
        _add_counts(self.status, _column(chunk, "status"))
        for col, counts in self.distinct.items():
            _add_counts(counts, pc.drop_null(_column(chunk, col)))
        if self.unit:
            self._add_times(chunk)
        self._add_stages(chunk)

    def _add_times(self, chunk: pa.Table) -> None:
        finished = chunk["finished_at"]
        timed = pa.table({"run": _or(_column(chunk, "run"), "run"), "at": pc.cast(finished, pa.int64()),
                          "row": chunk["_row"]}).filter(pc.is_valid(finished))
        if not len(timed):
            return
        runs = pc.dictionary_encode(timed["run"]).combine_chunks()
        codes, ticks, rows = runs.indices.to_numpy(), timed["at"].to_numpy(), timed["row"].to_numpy()
        for code, run in enumerate(runs.dictionary.to_pylist()):
            mine = codes == code
            t = self.times.setdefault(run, _Times(_Sample(run, np.int64)))
            i = int(np.argmin(ticks[mine]))  # the first of the earliest: rows are in manifest order
            t.first = min(t.first, (int(ticks[mine][i]), int(rows[mine][i])))
            t.rows += int(mine.sum())
            t.sample.add(ticks[mine])

    def _add_stages(self, chunk: pa.Table) -> None:
        timings = _column(chunk, "timings_ms")
        if not pa.types.is_struct(timings.type):
            return
        names = {timings.type.field(i).name for i in range(timings.type.num_fields)}
        for s in STAGES:
            if s not in names:
                continue
            ms = pc.struct_field(timings, s)  # null where the row has no timings
            ms = ms.filter(pc.not_equal(ms, 0))  # a stage that took 0 ms (or was not timed) is not a sample
            if len(ms):
                stage = self.stages.setdefault(s, _Stage(_Sample(s, np.float64)))
                stage.n += len(ms)
                stage.total += pc.sum(ms).as_py()
                stage.sample.add(ms.to_numpy())

    def throughput(self) -> dict[str, np.ndarray]:
        """run -> seconds since its first row of its finished rows (sampled), ascending; runs by first row."""
        per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}.get(self.unit, 1)
        runs = sorted(self.times.items(), key=lambda kv: kv[1].first)
        # exact ticks, one division: as timedelta.total_seconds()
        return {run: (np.sort(t.sample.values()) - t.first[0]) / per_second for run, t in runs}


class _LatestRows:
    """Tallies over each image's latest row, fed bucket by bucket (rows in manifest order, `_row` their place)."""

    def __init__(self, ev: Evaluation | None, gallery: int, per_page: int):
        self.images, self.status, self.failures = 0, {}, {}
        self.by_dst = {path_of(r["sr_uri"]): r for r in (ev.rows if ev else []) if r.get("sr_uri")}
        scored = [p for p, r in self.by_dst.items() if r.get("psnr") is not None]
        self.scored = pa.array(scored, pa.string())
        self.worst_n = min(per_page, max(1, gallery // 3)) if ev else 0
        self.sample_n = gallery
        self.worst: list[tuple] = []  # (psnr, _row, row), the worst_n lowest
        self.sample: list[tuple] = []  # (crc32 of image_id, image_id, row), the sample_n lowest

    def add(self, latest: pa.Table) -> None:
        self.images += len(latest)
        _add_counts(self.status, _column(latest, "status"))
        self._add_failures(latest)
        status, dst_uri = _column(latest, "status"), _column(latest, "dst_uri")
        ok = latest.filter(pc.and_(pc.equal(status, "ok"), pc.not_equal(dst_uri, "")))  # nulls drop out
        self._add_worst(ok)
        self._add_sample(ok)

    def _add_failures(self, latest: pa.Table) -> None:
        failed = latest.filter(pc.fill_null(pc.equal(_column(latest, "status"), "error"), False))
        keys = pa.table({"stage": _or(_column(failed, "stage"), "?"), "error_type": _or(_column(failed, "error_type"), "?"),
                         "message": pc.fill_null(_column(failed, "error_message"), ""),
                         "input": pc.fill_null(_column(failed, "src_uri"), ""), "row": failed["_row"]})
        for g in keys.group_by(["stage", "error_type"], use_threads=False).aggregate([]).to_pylist():
            mine = keys.filter(pc.and_(pc.equal(keys["stage"], g["stage"]), pc.equal(keys["error_type"], g["error_type"])))
            self.failures.setdefault((g["stage"], g["error_type"]), _Failures()).add(mine)

    def _add_worst(self, ok: pa.Table) -> None:
        if not self.worst_n or not len(self.scored):
            return
        paths = pc.replace_substring_regex(_column(ok, "dst_uri"), pattern="^file://", replacement="")  # path_of
        for r in ok.filter(pc.is_in(paths, value_set=self.scored)).to_pylist():
            self.worst.append((self.by_dst[path_of(r["dst_uri"])]["psnr"], r.pop("_row"), r))
        # by PSNR, ties in manifest order (as a stable sort of the latest rows)
        self.worst = sorted(self.worst, key=lambda w: w[:2])[:self.worst_n]

    def _add_sample(self, ok: pa.Table) -> None:
        if not self.sample_n or not len(ok):
            return
        ids = _column(ok, "image_id").to_pylist()
        picks = heapq.nsmallest(self.sample_n, ((zlib.crc32((i or "").encode()), i or "", k) for k, i in enumerate(ids)))
        rows = _rows(ok.drop_columns(["_row"]), [k for _, _, k in picks])
        self.sample = sorted(self.sample + [(c, i, r) for (c, i, _), r in zip(picks, rows)], key=lambda p: p[:2])
        del self.sample[self.sample_n:]

    def errors(self) -> list[ErrorGroup]:
        # most images first; equal sizes in order of the group's first image in the manifest
        groups = sorted(self.failures.items(), key=lambda kv: (-kv[1].images, kv[1].first))
        return [ErrorGroup(stage, error_type, f.images, list(f.messages)[:3], [i for _, i in f.inputs])
                for (stage, error_type), f in groups]

    def gallery(self) -> list[GalleryGroup]:
        def item(row: dict, why: str) -> GalleryItem:
            return GalleryItem(row, self.by_dst.get(path_of(row["dst_uri"])), why)

        sample = sorted((r for _, _, r in self.sample), key=lambda r: (r["image_id"] is None, r["image_id"] or ""))
        groups = [GalleryGroup("Lowest PSNR", "worst", [item(r, "lowest PSNR") for _, _, r in self.worst]),
                  GalleryGroup("Sample", "sample", [item(r, "sample") for r in sample])]
        return [g for g in groups if g.items]


@dataclass
class _Failures:
    """Images in error of one stage and error type, as the page shows them: the count and the first few."""

    images: int = 0
    first: int = np.iinfo(np.int64).max  # the manifest row of the group's first image
    messages: dict = field(default_factory=dict)  # the first 3 distinct messages -> their first row, in that order
    inputs: list = field(default_factory=list)  # (row, input) of the first 5 images

    def add(self, rows: pa.Table) -> None:
        """One bucket's images of the group, in manifest order. A bucket's first few are enough: whatever comes
        first overall is among the first few of its bucket."""
        self.images += len(rows)
        place = rows["row"]
        self.first = min(self.first, place[0].as_py())
        messages = dict(self.messages)
        for m in pc.unique(rows["message"])[:3].to_pylist():
            at = place[pc.index(rows["message"], m).as_py()].as_py()
            messages[m] = min(messages.get(m, at), at)
        self.messages = dict(sorted(messages.items(), key=lambda kv: kv[1])[:3])
        self.inputs = sorted(self.inputs + list(zip(place[:5].to_pylist(), rows["input"][:5].to_pylist())))[:5]


def _settings(dst: str, every: _AllRows, summary: dict) -> list[tuple[str, object]]:
    def distinct(col):
        # most rows first; the sort is stable, so ties stay in order of first appearance (as Counter.most_common)
        top = sorted(every.distinct[col].items(), key=lambda kv: -kv[1])[:5]
        return ", ".join(f"{k} ({n} rows)" for k, n in top) or None

    items = [("DST", dst), ("SRC", summary.get("src")), ("preset", summary.get("preset")),
             ("params_hash", distinct("params_hash")), ("model_id", distinct("model_id")),
             ("runs", distinct("run")), ("nodes", distinct("node_id")),
             ("images in the last run's plan", summary.get("images")),
             ("last run wall time (s)", summary.get("wall_s")), ("last run images/s", summary.get("images_per_s")),
             ("pools", summary.get("pools"))]
    return [(k, v) for k, v in items if v not in (None, "", {})]


def _counts(every: _AllRows, latest: _LatestRows) -> list[list]:
    now, all_rows = latest.status, every.status
    statuses = sorted(set(now) | set(all_rows), key=str)
    return [[s, now.get(s, 0), all_rows.get(s, 0)] for s in statuses] + [["total", latest.images, every.rows]]


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
