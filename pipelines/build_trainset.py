"""`ugcsr build-trainset`: HR images (and official HR/LR pairs) -> degraded training pairs as Parquet shards.

Each unit (one crop of one image) goes to the shard given by a hash of its
unit_id, so adding files to SRC changes only the shards that receive new units.
Within a shard, units sorted by unit_id form the degradation groups (the paper
preset draws its branch/resize/noise choices once per group of 10); group seeds
hash the group's first unit_id. A shard is computed from its units and seeds
alone, so the same --seed gives byte-identical shards whatever the number of
workers. A re-run skips a shard only when its manifest covers exactly its
planned units without errors (a partial shard of a --limit run, or one with
error rows, is rebuilt). The settings that shape the data are hashed into
DST/_state/settings.json and every shard's metadata; another setting into the
same DST is refused. Bad inputs become rows of DST/_manifest/, never a failed job.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.decode import DecodeError, decode_image
from cluster import ray_runtime
from cluster.storage import StorageConfig, check_no_userinfo, filesystem, is_remote, join, read_bytes, uri_of, write_bytes_atomic

from .paths import IMAGE_EXTENSIONS

SOURCES = ("lsdir", "official_pairs", "official_pairs_deg")
SHARD_SCHEMA = pa.schema([
    ("unit_id", pa.string()), ("gt_png", pa.binary()), ("lr_png", pa.binary()), ("prompt", pa.string()),
    ("source", pa.string()), ("degradation", pa.string()), ("seed", pa.int64()), ("src_uri", pa.string()),
])
MANIFEST_SCHEMA = pa.schema([
    ("unit_id", pa.string()), ("src_uri", pa.string()), ("source", pa.string()), ("shard", pa.int64()),
    ("status", pa.string()), ("error_type", pa.string()), ("error_message", pa.string()),
])


class TrainsetJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    src: str = Field(description="HR images: a folder/prefix (LSDIR layout or any tree)")
    dst: str
    pairs: str | None = Field(None, description="official paired set: a folder with hr/ and lr/ (same names)")
    preset: str = Field("paper", description="degradation preset: paper | realesrgan | ugc")
    seed: int = 0
    crop: int = Field(512, ge=16)
    mix: dict[str, int] = Field(
        default_factory=lambda: {"lsdir": 1, "official_pairs": 1, "official_pairs_deg": 1},
        description="crops per image for each source (0 leaves a source out)",
    )
    min_pixels: int = Field(384 * 384, ge=1, description="smaller HR images are skipped (as released)")
    min_file_bytes: int = Field(100_000, ge=0, description="smaller files are skipped (as released)")
    shards: int = Field(256, ge=1, description="hash buckets the crops are spread over (a dataset keeps its count); "
                                               "raise it for corpora over ~100k crops to keep shards near 200 MB")
    workers: int | None = Field(None, ge=1, description="concurrent shard tasks (default: Ray decides)")
    limit: int | None = Field(None, ge=1)
    storage: StorageConfig = StorageConfig()
    address: str | None = None
    ram: str | None = Field(None, description="ram_swin_large_14m.pth: tag each GT crop for its prompt (as released)")
    ram_config: str = Field("swin_l", pattern="^(swin_l|tiny)$")
    ram_tag_list: str | None = None
    ram_thresholds: str | None = None

    @field_validator("src", "dst", "pairs")
    @classmethod
    def _absolute_local(cls, v):
        import os

        if v is None or is_remote(check_no_userinfo(v, "path")):
            return v
        return os.path.abspath(os.path.expanduser(v.removeprefix("file://")))

    def settings(self) -> dict:
        """The settings that shape the shards' bytes (not where they go or how many workers build them)."""
        return self.model_dump(mode="json", exclude={"dst", "storage", "address", "workers", "limit"})

    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:16]

    @field_validator("mix")
    @classmethod
    def _known_sources(cls, v):
        unknown = set(v) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown sources in mix: {sorted(unknown)}; known: {', '.join(SOURCES)}")
        return v


def _hash_int(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _images(root: str, storage: StorageConfig) -> list[str]:
    fs, path = filesystem(root, storage)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{root} is not a folder/prefix of images")
    files = sorted(p for p in fs.find(path) if posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS)
    return [uri_of(fs, p) if is_remote(root) else "file://" + p for p in files]


def list_units(job: TrainsetJob) -> list[dict]:
    """Every crop to make, ordered by (shard, unit_id); shard and seeds depend on the unit alone, not its position."""
    units = []
    for uri in _images(job.src, job.storage):
        for k in range(job.mix.get("lsdir", 0)):
            units.append({"source": "lsdir", "src_uri": uri, "lr_uri": None, "crop_index": k})
    if job.pairs:
        hr = _images(join(job.pairs, "hr"), job.storage)
        lr_root = join(job.pairs, "lr")
        for uri in hr:
            lr_uri = uri.replace(join(job.pairs, "hr").removeprefix("file://"), lr_root.removeprefix("file://"), 1)
            for source in ("official_pairs", "official_pairs_deg"):
                for k in range(job.mix.get(source, 0)):
                    units.append({"source": source, "src_uri": uri, "lr_uri": lr_uri, "crop_index": k})
    if not units:
        where = f"SRC {job.src}" + (f" and --pairs {job.pairs}/hr" if job.pairs else "")
        raise FileNotFoundError(f"{where} hold no images (or the mix takes none of them); nothing to build")
    for u in units:
        u["unit_id"] = hashlib.sha256(f"{u['source']}|{u['src_uri']}|{u['crop_index']}".encode()).hexdigest()[:32]
        u["shard"] = _hash_int("shard", u["unit_id"]) % job.shards
    units.sort(key=lambda u: (u["shard"], u["unit_id"]))
    return units[: job.limit] if job.limit else units  # a limit takes whole shards first (the last may be partial)


def shard_path(job: TrainsetJob, shard: int) -> str:
    return join(job.dst, f"shard-{shard:06d}.parquet")


def manifest_path(job: TrainsetJob, shard: int) -> str:
    return join(job.dst, "_manifest", f"shard-{shard:06d}.parquet")


# ---------------------------------------------------------------- one shard (runs in a Ray task)


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb, np.float32) / 255).permute(2, 0, 1)


def _png(x: torch.Tensor) -> bytes:
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _crop(gt: torch.Tensor, size: int, scale: int, rng: np.random.Generator):
    """Reflect-pad to at least `size`, take a random crop aligned to the scale, maybe flip."""
    _, h, w = gt.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        gt = torch.nn.functional.pad(gt[None], (0, pw, 0, ph), mode=mode)[0]
        _, h, w = gt.shape
    y = int(rng.integers(0, (h - size) // scale + 1)) * scale
    x = int(rng.integers(0, (w - size) // scale + 1)) * scale
    flip = bool(rng.uniform() < 0.5)
    return gt[:, y : y + size, x : x + size], (x, y, flip)


_TAGGERS: dict = {}


def _tagger(job: TrainsetJob):
    """Plain RAM (no DAPE) on the GT, as the release captioned its training data; one per worker process."""
    if job.ram is None:
        return None
    key = (job.ram, job.ram_config, job.ram_tag_list, job.ram_thresholds)
    if key not in _TAGGERS:
        from srmodel.ram import TINY_RAM_CONFIG, RAMConfig, load_tagger
        from srmodel.ram.model import TAG_LIST, THRESHOLDS

        _TAGGERS[key] = load_tagger(job.ram, None, config=TINY_RAM_CONFIG if job.ram_config == "tiny" else RAMConfig(),
                                    tag_list=job.ram_tag_list or TAG_LIST, thresholds=job.ram_thresholds or THRESHOLDS)
    return _TAGGERS[key]


def build_shard(batch: dict, job: dict) -> dict:
    from srmodel.degrade import degrade_group, get_degrade_preset
    from srmodel.degrade.ops import usm_sharpen

    job = TrainsetJob.model_validate(job)
    shard = int(batch["shard"][0])
    units = json.loads(str(batch["units"][0]))
    cfg = get_degrade_preset(job.preset)
    s = cfg.scale
    rows, manifest, prepared = [], [], []
    units.sort(key=lambda u: u["unit_id"])
    for k, u in enumerate(units):  # groups of choice_group consecutive unit_ids; the seed hashes the first one
        u["group"] = units[k - k % cfg.choice_group]["unit_id"]
    for u in units:
        record = {"unit_id": u["unit_id"], "src_uri": u["src_uri"], "source": u["source"], "shard": shard}
        try:
            data = read_bytes(u["src_uri"], job.storage)
            if u["source"] == "lsdir" and len(data) < job.min_file_bytes:
                manifest.append({**record, "status": "skipped", "error_type": "TooSmall",
                                 "error_message": f"{len(data)} bytes < min_file_bytes={job.min_file_bytes}"})
                continue
            rgb, _ = decode_image(data)
            if u["source"] == "lsdir" and rgb.shape[0] * rgb.shape[1] < job.min_pixels:
                manifest.append({**record, "status": "skipped", "error_type": "TooSmall",
                                 "error_message": f"{rgb.shape[1]}x{rgb.shape[0]} < min_pixels={job.min_pixels}"})
                continue
            rng = np.random.default_rng(_hash_int(job.seed, "crop", u["unit_id"]))
            gt, (x, y, flip) = _crop(_to_tensor(rgb), job.crop, s, rng)
            lr_official = None
            if u["source"] == "official_pairs":
                lr_rgb, _ = decode_image(read_bytes(u["lr_uri"], job.storage))
                lr_full = _to_tensor(lr_rgb)
                if lr_full.shape[1] * s != rgb.shape[0] or lr_full.shape[2] * s != rgb.shape[1]:
                    raise DecodeError(f"LR {u['lr_uri']} is not 1/{s} of its HR")
                lr_full = torch.nn.functional.pad(lr_full[None], (0, max(0, job.crop // s - lr_full.shape[2]),
                                                                   0, max(0, job.crop // s - lr_full.shape[1])),
                                                  mode="replicate")[0]
                lr_official = lr_full[:, y // s : (y + job.crop) // s, x // s : (x + job.crop) // s]
            if flip:
                gt = gt.flip(-1)
                lr_official = lr_official.flip(-1) if lr_official is not None else None
            prepared.append((u, record, gt, lr_official, {"crop_x": x, "crop_y": y, "flip": flip}))
        except Exception as err:  # noqa: BLE001 - one bad image is a row, not a failed job
            manifest.append({**record, "status": "error", "error_type": type(err).__name__, "error_message": str(err)[:2000]})
    # Degradation groups share the group draws (the paper preset's per-batch quirk).
    groups: dict[str, list] = {}
    for item in prepared:
        groups.setdefault(item[0]["group"], []).append(item)
    for gkey, items in sorted(groups.items()):
        seed = _hash_int(job.seed, "group", gkey)
        to_degrade = [it for it in items if it[3] is None]
        if to_degrade:
            target, lr, params = degrade_group(torch.stack([it[2] for it in to_degrade]), cfg, seed)
            outputs = {id(it): (target[k], lr[k], params[k]) for k, it in enumerate(to_degrade)}
        else:
            outputs = {}
        for it in items:
            u, record, gt, lr_official, crop_info = it
            if lr_official is not None:  # official pair: its own LR, sharpened target as released
                tgt = usm_sharpen(gt[None])[0] if cfg.usm_target else gt
                out_lr, params = lr_official, {"branch": "official", "seed": seed}
            else:
                tgt, out_lr, params = outputs[id(it)]
            rows.append({"unit_id": u["unit_id"], "gt_png": _png(tgt), "lr_png": _png(out_lr), "prompt": _prompt(job, gt),
                         "source": u["source"], "degradation": json.dumps({**params, **crop_info}, sort_keys=True),
                         "seed": seed, "src_uri": u["src_uri"]})
            manifest.append({**record, "status": "ok", "error_type": None, "error_message": None})
    rows.sort(key=lambda r: r["unit_id"])
    meta = {"settings_hash": job.settings_hash()}
    _write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA.with_metadata(meta)), shard_path(job, shard), job.storage)
    # The manifest is written last: it marks the shard complete for a re-run.
    _write_table(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA.with_metadata(meta)), manifest_path(job, shard),
                 job.storage)
    status = Counter(m["status"] for m in manifest)
    return {"shard": [shard], "ok": [status["ok"]], "error": [status["error"]], "skipped": [status["skipped"]]}


def _prompt(job: TrainsetJob, gt: torch.Tensor) -> str:
    tagger = _tagger(job)
    if tagger is None:
        return ""
    rgb = (gt.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return tagger([rgb])[0] + ","  # stored as "<tags>," like the release's tag/*.txt


def _write_table(table: pa.Table, uri: str, storage: StorageConfig) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(uri, buf.getvalue(), storage)


# ---------------------------------------------------------------- the job (driver)


def _shard_done(job: TrainsetJob, shard: int, units: list[dict]) -> bool:
    """Complete: shard and manifest present, the manifest covers exactly these units, none in error."""
    fs, path = filesystem(manifest_path(job, shard), job.storage)
    if not (fs.exists(path) and fs.exists(filesystem(shard_path(job, shard), job.storage)[1])):
        return False
    try:
        table = pq.read_table(io.BytesIO(fs.cat_file(path)), columns=["unit_id", "status"])
    except Exception:  # noqa: BLE001 - an unreadable manifest means: build the shard again
        return False
    return ("error" not in table["status"].to_pylist()
            and sorted(table["unit_id"].to_pylist()) == sorted(u["unit_id"] for u in units))


def plan_shards(job: TrainsetJob) -> tuple[dict[int, list[dict]], list[int]]:
    shards: dict[int, list[dict]] = {}
    for u in list_units(job):
        shards.setdefault(u["shard"], []).append(u)
    return shards, [s for s in sorted(shards) if _shard_done(job, s, shards[s])]


def settings_uri(job: TrainsetJob) -> str:
    return join(job.dst, "_state", "settings.json")


def check_settings(job: TrainsetJob, *, write: bool) -> None:
    """Refuse to mix shards of other settings into DST (the card would describe data that is not there)."""
    uri = settings_uri(job)
    fs, path = filesystem(uri, job.storage)
    if fs.exists(path):
        stored = json.loads(fs.cat_file(path))
        if stored.get("settings_hash") != job.settings_hash():
            old, new = stored.get("settings", {}), job.settings()
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                             if old.get(k) != new.get(k))
            raise ValueError(f"DST {job.dst} holds a dataset built with other settings ({diff}); "
                             "use another DST, or the settings it was built with")
        return
    if write:
        body = {"settings_hash": job.settings_hash(), "settings": job.settings()}
        write_bytes_atomic(uri, json.dumps(body, indent=2, sort_keys=True).encode(), job.storage)


def plan(job: TrainsetJob) -> dict:
    """What a run would do (the dry run): counts only; loads no model, writes nothing."""
    from srmodel.degrade import get_degrade_preset

    get_degrade_preset(job.preset)
    check_settings(job, write=False)
    shards, done = plan_shards(job)
    units = [u for s in shards.values() for u in s]
    return {"crops": len(units), "by_source": dict(Counter(u["source"] for u in units)), "shards": len(shards),
            "shards_done": len(done), "shards_to_build": len(shards) - len(done),
            "crops_to_build": sum(len(shards[s]) for s in shards if s not in done),
            "settings_hash": job.settings_hash()}


def run_build_trainset(job: TrainsetJob, *, num_cpus: int | None = None, on_shard=None, on_plan=None) -> dict:
    """Build the missing shards; `on_plan(crops_to_build, shards_to_build)` before, `on_shard(batch)` per shard."""
    from cluster.lease import DstLease

    with DstLease(job.dst, job.storage):  # one writer per DST (docs/cluster.md)
        return _build_leased(job, num_cpus=num_cpus, on_shard=on_shard, on_plan=on_plan)


def _build_leased(job: TrainsetJob, *, num_cpus: int | None = None, on_shard=None, on_plan=None) -> dict:
    from srmodel.degrade import get_degrade_preset

    started = time.perf_counter()
    get_degrade_preset(job.preset)  # an unknown preset fails before any work
    check_settings(job, write=False)
    shards, done = plan_shards(job)
    todo = [s for s in sorted(shards) if s not in done]
    if on_plan:
        on_plan(sum(len(shards[s]) for s in todo), len(todo))
    totals = Counter()
    if todo:
        check_settings(job, write=True)
        ray_runtime.connect(job.address, num_cpus=num_cpus)
        import ray.data
        from ray.data import TaskPoolStrategy

        ray.data.DataContext.get_current().enable_progress_bars = False
        items = [{"shard": s, "units": json.dumps(shards[s])} for s in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        compute = TaskPoolStrategy(size=job.workers) if job.workers else None
        ds = ds.map_batches(build_shard, batch_size=1, fn_kwargs={"job": job.model_dump(mode="json")},
                            num_cpus=1, compute=compute)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for key in ("ok", "error", "skipped"):
                totals[key] += int(np.sum(batch[key]))
            if on_shard:
                on_shard(batch)
    card = dataset_card(job)
    summary = {"shards": len(shards), "shards_skipped": len(done), "processed": dict(totals),
               "wall_s": round(time.perf_counter() - started, 3), "by_branch": card["by_branch"], "card": card}
    if card.get("note"):
        summary["note"] = card["note"]
    return summary


def branch_note(job: TrainsetJob, branches: Counter) -> str | None:
    """Why a small trial may show no degradation at all (the paper preset draws the branch per group)."""
    from srmodel.degrade import get_degrade_preset

    drawn = {b: n for b, n in branches.items() if not b.endswith("/official")}
    if not drawn or any(b.endswith("/degrade") for b in drawn):
        return None
    group = get_degrade_preset(job.preset).choice_group
    per = f"once per group of {group} crops" if group > 1 else "per crop"
    return (f"all {sum(drawn.values())} degraded-source crops drew the clean (bicubic-only) branch: preset "
            f"{job.preset!r} draws the branch {per}, so a trial this small can show no degradation; "
            "use more images, or --preset realesrgan to see degradations on a few")


def dataset_card(job: TrainsetJob) -> dict:
    """Counts per source/branch/status and histograms of the sampled parameters, over all shards."""
    fs, root = filesystem(job.dst, job.storage)
    sources, branches, hist = Counter(), Counter(), {k: Counter() for k in
                                                     ("kernel1", "noise1", "jpeg1", "resize1", "final_sinc", "jpeg2")}
    for path in sorted(fs.glob(root.rstrip("/") + "/shard-*.parquet")):
        table = pq.read_table(io.BytesIO(fs.cat_file(path)), columns=["source", "degradation"])
        for source, deg in zip(table["source"].to_pylist(), table["degradation"].to_pylist()):
            d = json.loads(deg)
            sources[source] += 1
            branches[f"{source}/{d.get('branch')}"] += 1
            if d.get("branch") == "degrade":
                hist["kernel1"][d["kernel1"]["type"]] += 1
                hist["noise1"][d["noise1"]["type"]] += 1
                hist["resize1"][d["resize1"]["type"]] += 1
                hist["final_sinc"][d["final_sinc"]["type"]] += 1
                hist["jpeg1"][f"{d['jpeg1'] // 5 * 5}-{d['jpeg1'] // 5 * 5 + 4}"] += 1
                hist["jpeg2"][f"{d['jpeg2'] // 5 * 5}-{d['jpeg2'] // 5 * 5 + 4}"] += 1
    status = Counter()
    for path in sorted(fs.glob(root.rstrip("/") + "/_manifest/shard-*.parquet")):
        for st, et in zip(*pq.read_table(io.BytesIO(fs.cat_file(path)), columns=["status", "error_type"]).to_pydict().values()):
            status[st if st == "ok" else f"{st}:{et}"] += 1
    card = {"preset": job.preset, "seed": job.seed, "crop": job.crop, "mix": job.mix,
            "settings_hash": job.settings_hash(), "pairs": sum(sources.values()),
            "by_source": dict(sources), "by_branch": dict(branches), "by_status": dict(status),
            "histograms": {k: dict(sorted(v.items())) for k, v in hist.items()}}
    note = branch_note(job, branches)
    if note:
        card["note"] = note
    write_bytes_atomic(join(job.dst, "dataset_card.json"), json.dumps(card, indent=2).encode(), job.storage)
    return card
