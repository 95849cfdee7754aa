"""`ugcsr evaluate SR GT`: the NTIRE 2025 KwaiSR metrics of SR images against ground truth, on Ray Data.

SR is an upscale DST (its manifest says which outputs exist and which inputs
failed) or a plain folder; GT a folder or prefix. Pairs are matched by
relative path without extension (then by file stem where that is unique);
every GT image gets one row in `metrics.parquet`, unmatched SR files are
listed in `summary.json`.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import re
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster import ray_runtime
from cluster.storage import StorageConfig, filesystem, is_local, is_remote, join, uri_of, write_bytes_atomic
from srmodel.metrics.challenge import SCORE_WEIGHTS, challenge_score
from srmodel.sampling.seeds import image_id_from_uri

from .paths import IMAGE_EXTENSIONS, output_key
from .upscale.outputs import open_run_manifest, read_listing

METRICS = ("psnr", "ssim", "lpips", "musiq", "maniqa", "clipiqa")
SCHEMA = pa.schema(
    [("image", pa.string()), ("image_id", pa.string()), ("gt_uri", pa.string()), ("sr_uri", pa.string()),
     ("status", pa.string()), ("stage", pa.string()), ("error_type", pa.string()), ("error_message", pa.string())]
    + [(m, pa.float64()) for m in METRICS]
    + [(c, pa.int32()) for c in ("gt_width", "gt_height", "sr_width", "sr_height")]
    + [("t_metrics_ms", pa.float64())]
)
MAX_LISTED = 1000  # unpaired files named in summary.json (the counts are always complete)

# EVALUATION.md: published numbers (PSNR / SSIM / LPIPS / MUSIQ / MANIQA-pipal / CLIPIQA).
PUBLISHED = {
    "RealSR": {
        "SeeSR (50)": (25.18, 0.7216, 0.3009, 69.77, 0.6442, 0.6612),
        "OSEDiff (1)": (25.15, 0.7341, 0.2921, 69.09, 0.6326, 0.6693),
        "Real-ESRGAN": (25.69, 0.7616, 0.2727, 60.18, 0.5487, 0.4449),
    },
    "DRealSR": {
        "SeeSR (50)": (28.17, 0.7691, 0.3189, 64.93, 0.6042, 0.6804),
        "OSEDiff (1)": (27.92, 0.7835, 0.2968, 64.65, 0.5899, 0.6963),
        "Real-ESRGAN": (28.64, 0.8053, 0.2847, 54.18, 0.4907, 0.4422),
    },
}


class EvalResources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    actors: int | None = Field(None, ge=1, description="metric actors; default: half the cluster's CPUs, at least 1")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0, description="> 0 runs LPIPS/no-reference metrics on GPUs")
    batch: int = Field(4, ge=1, description="pairs per batch")


class EvalJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sr: str
    gt: str
    out: str | None = Field(None, description="default: SR/_eval")
    address: str | None = None
    storage: StorageConfig = StorageConfig()
    crop_border: int = Field(4, ge=0)
    lpips: bool = True
    no_reference: bool = True
    strip: str | None = Field(None, description="regex removed from file stems before pairing, e.g. '_(HR|LR\\d|x\\d)$'")
    dataset: str = Field("auto", description="auto | RealSR | DRealSR | none: which published numbers to compare with")
    max_pixels: int = Field(64_000_000, ge=1)
    resources: EvalResources = EvalResources()

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        names = {k.lower(): k for k in PUBLISHED} | {"auto": "auto", "none": "none"}
        if v.lower() not in names:
            raise ValueError(f"dataset {v!r}: choose auto, none or one of {', '.join(PUBLISHED)}")
        return names[v.lower()]

    def out_dir(self) -> str:
        return self.out or join(self.sr, "_eval")


# ---------------------------------------------------------------- listing and pairing

def _list_images(root_uri: str, storage: StorageConfig, skip: tuple[str, ...] = (), outputs: bool = False) -> dict[str, str]:
    """relative path -> URI for every image under a folder/prefix (for SR `outputs`, metadata folders `_*` left out)."""
    fs, root = filesystem(root_uri, storage)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{root_uri} is not a folder/prefix of images; give a local folder or s3://bucket/prefix")
    root = root.rstrip("/")
    skip_paths = tuple(filesystem(s, storage)[1].rstrip("/") + "/" for s in skip)
    out = {}
    for p in sorted(fs.find(root)):
        rel = p[len(root) + 1:]
        if posixpath.splitext(p)[1].lower() not in IMAGE_EXTENSIONS or p.startswith(skip_paths):
            continue
        if outputs and any(part.startswith("_") for part in rel.split("/")[:-1]):
            continue  # _manifest/, _state/, _eval/, report assets: never SR outputs
        out[rel] = "file://" + p if is_local(fs) else uri_of(fs, p)
    return out


def _key(rel: str, strip: re.Pattern | None) -> str:
    """Pairing key: the path as upscale names outputs (sanitised), without extension, stem stripped."""
    key = output_key(rel, "x")[:-2]
    if strip is None:
        return key
    head, stem = posixpath.split(key)
    return posixpath.join(head, strip.sub("", stem))


def sr_candidates(job: EvalJob) -> tuple[dict[str, str], dict[str, dict], str]:
    """(relative path -> SR URI, relative key -> failed manifest row, source kind).

    The manifest is read bucket by bucket of images (`RunManifest.latest_buckets`: bounded memory); what is
    kept is one entry per output or failed input, in manifest order (each image's first row).
    """
    manifest = open_run_manifest(job.sr, job.storage, columns=["image_id", "status", "stage", "error_type",
                                                                "error_message", "dst_uri", "finished_at"])
    if manifest is None:
        return _list_images(job.sr, job.storage, skip=(job.out_dir(),), outputs=True), {}, "folder"
    fs, root = filesystem(job.sr, job.storage)
    root = root.rstrip("/") + "/"
    listing = read_listing(job.sr, job.storage)
    keys = dict(zip(listing["image_id"].to_pylist(), listing["dst_key"].to_pylist())) if listing is not None else {}
    outputs, failed = {}, {}
    rows = (row for latest in manifest.latest_buckets() for part in latest.to_batches(10_000) for row in part.to_pylist())
    for row in rows:  # dicts for 10,000 rows at a time, not a bucket's million
        place = row.pop("_row")
        key, uri = keys.get(row["image_id"]), None
        dst_path = filesystem(row["dst_uri"], job.storage)[1] if row.get("dst_uri") else None
        if dst_path and dst_path.startswith(root):
            key, uri = dst_path[len(root):], row["dst_uri"] if "://" in row["dst_uri"] else "file://" + dst_path
        elif key is not None:  # DST was copied elsewhere since: its outputs are under SR, by their listed keys
            uri = join(job.sr, key) if is_remote(job.sr) else "file://" + join(root.rstrip("/"), key)
        if key is None:
            continue  # an error row of an input we cannot place (no listing): it has no output either
        if row["status"] == "ok" and row.get("dst_uri"):
            _place(outputs, key, place, uri)
        elif row["status"] == "error":
            _place(failed, key, place, row)
    return _in_order(outputs), _in_order(failed), "upscale run"


def _place(found: dict, key: str, place: int, value) -> None:
    """found[key] = value, remembering the places (manifest rows) of the first image and of the value's."""
    first, at, old = found.get(key, (place, -1, None))
    found[key] = (min(first, place), *((place, value) if place > at else (at, old)))


def _in_order(found: dict) -> dict:
    """As a dict filled image by image in manifest order reads: keys at their first image, the last one's value."""
    return {k: v for k, (_, _, v) in sorted(found.items(), key=lambda kv: kv[1][0])}


def pair(gt: dict[str, str], sr: dict[str, str], strip: str | None) -> tuple[dict[str, str], list[str], list[str]]:
    """GT relative path -> SR URI; and the unpaired GT and SR relative paths."""
    pattern = re.compile(strip) if strip else None
    sr_by_key = {}
    for rel in sr:
        sr_by_key.setdefault(_key(rel, pattern), rel)
    pairs, used = {}, set()
    for rel in gt:
        match = sr_by_key.get(_key(rel, pattern))
        if match is not None and match not in used:
            pairs[rel] = sr[match]
            used.add(match)
    # Second pass: the file stem alone, where it is unique on both sides (e.g. GT flat, SR nested).
    def stems(rels):
        c = Counter(posixpath.basename(_key(r, pattern)) for r in rels)
        return {posixpath.basename(_key(r, pattern)): r for r in rels if c[posixpath.basename(_key(r, pattern))] == 1}

    left_gt = stems([r for r in gt if r not in pairs])
    left_sr = stems([r for r in sr if r not in used])
    for stem, rel in left_gt.items():
        if stem in left_sr:
            pairs[rel] = sr[left_sr[stem]]
            used.add(left_sr[stem])
    return pairs, [r for r in gt if r not in pairs], [r for r in sr if r not in used]


# ---------------------------------------------------------------- the run

def _error_row(image: str, gt_uri: str, stage: str, error_type: str, message: str, sr_uri: str | None = None) -> dict:
    return dict(image=image, image_id=image_id_from_uri(gt_uri), gt_uri=gt_uri, sr_uri=sr_uri, status="error",
                stage=stage, error_type=error_type, error_message=message)


def _rows_from_batch(batch: dict) -> list[dict]:
    rows = []
    for i in range(len(batch["image"])):
        err = str(batch["error_type"][i])
        row = {k: str(batch[k][i]) for k in ("image", "image_id", "gt_uri", "sr_uri")}
        row.update(status="error" if err else "ok", stage=str(batch["stage"][i]) or None, error_type=err or None,
                   error_message=str(batch["error_message"][i]) or None)
        for m in METRICS:
            v = float(batch[m][i])
            row[m] = None if math.isnan(v) else v
        for c in ("gt_width", "gt_height", "sr_width", "sr_height"):
            row[c] = int(batch[c][i]) or None
        row["t_metrics_ms"] = float(batch["t_metrics_ms"][i])
        rows.append(row)
    return rows


def run_evaluate(job: EvalJob, *, num_cpus: int | None = None) -> dict:
    started = time.perf_counter()
    gt = _list_images(job.gt, job.storage)
    if not gt:
        raise FileNotFoundError(f"GT {job.gt} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    sr, failed, sr_kind = sr_candidates(job)
    pairs, unpaired_gt, unpaired_sr = pair(gt, sr, job.strip)

    rows: list[dict] = []
    pattern = re.compile(job.strip) if job.strip else None
    failed_keys = {_key(k, pattern): r for k, r in failed.items()}
    for rel in unpaired_gt:
        up = failed_keys.get(_key(rel, pattern))
        if up is not None:  # the upscale run failed on this image: say so, with its own error
            rows.append(_error_row(rel, gt[rel], "upscale", up.get("error_type") or "Error",
                                   f"upscale failed at {up.get('stage')}: {up.get('error_message')}"))
        else:
            rows.append(_error_row(rel, gt[rel], "pair", "Unpaired",
                                   f"no SR image for GT {rel} in {job.sr} (matched by relative path or unique stem"
                                   f"{', after stripping ' + repr(job.strip) if job.strip else ''}); "
                                   "check the names or pass --strip"))

    unavailable: dict[str, str] = {}
    if pairs:
        ray_runtime.connect(job.address, num_cpus=num_cpus)
        rows_ok, unavailable = _run_pairs(job, gt, pairs)
        rows += rows_ok
    rows.sort(key=lambda r: r["image"])
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    summary = summarize(job, table, unavailable, sr_kind, len(gt), len(sr), unpaired_gt, unpaired_sr,
                        time.perf_counter() - started)
    out = job.out_dir()
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(join(out, "metrics.parquet"), buf.getvalue(), job.storage)
    write_bytes_atomic(join(out, "summary.json"), json.dumps(summary, indent=2).encode(), job.storage)
    return summary


def _run_pairs(job: EvalJob, gt: dict[str, str], pairs: dict[str, str]) -> tuple[list[dict], dict]:
    import ray.data
    from ray.data import ActorPoolStrategy

    from actors.metrics import MetricsStage

    r = job.resources
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.wait_for_min_actors_s = 600
    images = sorted(pairs)
    todo = pa.table({"image": images, "image_id": [image_id_from_uri(gt[i]) for i in images],
                     "gt_uri": [gt[i] for i in images], "sr_uri": [pairs[i] for i in images]})
    actors = r.actors or max(1, min(len(images), int(ray_runtime.cluster_cpus() // 2) or 1))
    ds = ray.data.from_arrow([todo.slice(i, r.batch) for i in range(0, len(todo), r.batch)])
    ds = ds.map_batches(MetricsStage, fn_constructor_kwargs=dict(
        storage=job.storage.model_dump(mode="json"), crop_border=job.crop_border, lpips=job.lpips,
        no_reference=job.no_reference, max_pixels=job.max_pixels, cpu_threads=max(1, int(r.cpus_per_actor)),
        device=None if r.gpus_per_actor > 0 else "cpu"),  # never a GPU the actor did not reserve
        batch_size=r.batch, compute=ActorPoolStrategy(size=actors), num_cpus=r.cpus_per_actor,
        num_gpus=r.gpus_per_actor)
    rows, unavailable = [], {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        rows += _rows_from_batch(batch)
        for blob in set(batch["unavailable"]):
            unavailable.update(json.loads(str(blob)))
    return rows, unavailable


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def detect_dataset(job: EvalJob) -> str | None:
    if job.dataset != "auto":
        return None if job.dataset == "none" else job.dataset
    gt = job.gt.lower()
    return "DRealSR" if "drealsr" in gt else "RealSR" if "realsr" in gt else None


def summarize(job: EvalJob, table: pa.Table, unavailable: dict, sr_kind: str, n_gt: int, n_sr: int,
              unpaired_gt: list[str], unpaired_sr: list[str], wall: float) -> dict:
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    means = {m: _mean([r[m] for r in ok]) for m in METRICS}
    missing = {m: unavailable.get(m, "no image pair could be evaluated") for m in METRICS if means[m] is None}
    if not ok:
        missing.update({m: "no image pair could be evaluated" for m in ("psnr", "ssim")})
    score = challenge_score(means)
    dataset = detect_dataset(job)
    summary = {
        "sr": job.sr, "gt": job.gt, "sr_kind": sr_kind,
        "protocol": {"psnr_ssim": f"Y (BT.601) of RGB, crop_border={job.crop_border}, float64 on 0-255; "
                                  "SSIM 11x11 Gaussian window, sigma 1.5, valid region (BasicSR, NTIRE 2025 KwaiSR)",
                     "lpips": "AlexNet, v0.1 (torchmetrics)", "maniqa": "KonIQ-trained variant (pyiqa maniqa-koniq)",
                     "musiq": "KonIQ head (pyiqa musiq-koniq)", "clipiqa": "pyiqa clipiqa"},
        "counts": {"gt_images": n_gt, "sr_images": n_sr, "rows": len(rows), "ok": len(ok),
                   "error": len(rows) - len(ok), "unpaired_gt": len(unpaired_gt), "unpaired_sr": len(unpaired_sr)},
        "by_error_type": dict(Counter(r["error_type"] for r in rows if r["error_type"])),
        "means": means,
        "psnr_infinite": sum(1 for r in ok if r["psnr"] is not None and math.isinf(r["psnr"])),
        "missing": missing,
        "score": score,
        "score_note": ("PSNR + 10 SSIM - 10 LPIPS + 0.1 MUSIQ + 10 MANIQA + 10 CLIPIQA over these pairs; the challenge "
                       "takes the full-reference terms on its synthetic subset and the others on its wild subset")
        if score is not None else "not computed: " + ", ".join(sorted(k for k in SCORE_WEIGHTS if means.get(k) is None))
        + " missing (see `missing`)",
        "unpaired_gt": unpaired_gt[:MAX_LISTED],
        "unpaired_sr": unpaired_sr[:MAX_LISTED],
        "wall_s": round(wall, 3),
        "pairs_per_s": round(len(ok) / wall, 4) if wall > 0 else None,
    }
    if dataset:
        summary["comparison"] = comparison(dataset, means)
    return summary


def comparison(dataset: str, means: dict) -> dict:
    """This run beside the published numbers for the same benchmark (EVALUATION.md)."""
    cols = ["psnr", "ssim", "lpips", "musiq", "maniqa", "clipiqa"]
    rows = [{"method": "this run", **{c: means.get(c) for c in cols}}]
    rows += [{"method": name, **dict(zip(cols, vals))} for name, vals in PUBLISHED[dataset].items()]
    return {"dataset": dataset, "rows": rows,
            "note": "published MANIQA is the PIPAL-trained variant, this run's is the KonIQ one: not comparable; "
                    "published numbers are on the full benchmark, this run on the pairs above"}
