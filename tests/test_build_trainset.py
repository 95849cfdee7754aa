"""`build-trainset`: shards, schema, bad inputs, determinism across worker counts, resume, pairs, S3."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from inputs import rng_image
from pipelines.build_trainset import SHARD_SCHEMA, TrainsetJob, run_build_trainset


def make_hr(folder, n=7):
    folder.mkdir(parents=True)
    for k in range(n):
        rng_image(48 + 8 * (k % 3), 40 + 8 * (k % 2), k).save(folder / f"{k:03d}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    rng_image(8, 8, 99).save(folder / "tiny.png")  # below min_pixels
    return folder


def job(src, dst, **kw):
    return TrainsetJob.model_validate({"src": str(src), "dst": str(dst), "crop": 32, "min_pixels": 40 * 30,
                                       "min_file_bytes": 0, "shards": 4, **kw})


def shard_bytes(dst):
    return {p.name: pq.read_table(p).to_pylist() for p in sorted(dst.glob("shard-*.parquet"))}


def test_shards_schema_bad_inputs_and_card(ray_local, tmp_path):
    src = make_hr(tmp_path / "hr")
    dst = tmp_path / "out"
    summary = run_build_trainset(job(src, dst))
    assert summary["processed"] == {"ok": 7, "error": 1, "skipped": 1}
    tables = [pq.read_table(p) for p in sorted(dst.glob("shard-*.parquet"))]
    assert tables and all(t.schema.equals(SHARD_SCHEMA) for t in tables)
    rows = [r for t in tables for r in t.to_pylist()]
    assert len(rows) == 7
    for r in rows:
        gt, lr = Image.open(io.BytesIO(r["gt_png"])), Image.open(io.BytesIO(r["lr_png"]))
        assert gt.size == (32, 32) and lr.size == (8, 8)
        d = json.loads(r["degradation"])
        assert d["branch"] in ("clean", "degrade") and r["source"] == "lsdir" and r["prompt"] == ""
        assert d["seed"] == r["seed"]
    manifest = [r for p in (dst / "_manifest").glob("*.parquet") for r in pq.read_table(p).to_pylist()]
    bad = {r["src_uri"].rsplit("/", 1)[-1]: r for r in manifest if r["status"] != "ok"}
    assert bad["broken.png"]["status"] == "error" and bad["broken.png"]["error_type"] == "DecodeError"
    assert bad["tiny.png"]["status"] == "skipped" and bad["tiny.png"]["error_type"] == "TooSmall"
    card = json.loads((dst / "dataset_card.json").read_text())
    assert card["by_source"] == {"lsdir": 7} and sum(card["by_branch"].values()) == 7


def test_same_seed_same_bytes_on_one_or_two_workers_and_resume(ray_local, tmp_path):
    src = make_hr(tmp_path / "hr", n=12)
    one, two = tmp_path / "one", tmp_path / "two"
    run_build_trainset(job(src, one, workers=1, seed=5))
    run_build_trainset(job(src, two, workers=2, seed=5))
    assert shard_bytes(one) == shard_bytes(two)
    other = tmp_path / "other"
    run_build_trainset(job(src, other, seed=6))
    assert shard_bytes(other) != shard_bytes(one)
    # resume: a removed shard is rebuilt identically, the others are skipped
    first = sorted(one.glob("shard-*.parquet"))[0]
    before = first.read_bytes()
    first.unlink()
    again = run_build_trainset(job(src, one, workers=1, seed=5))
    assert again["shards_skipped"] == again["shards"] - 1
    assert first.read_bytes() == before


def test_official_pairs(ray_local, tmp_path):
    pairs = tmp_path / "pairs"
    (pairs / "hr").mkdir(parents=True)
    (pairs / "lr").mkdir()
    for k in range(2):
        hr = rng_image(64, 48, k)
        hr.save(pairs / "hr" / f"{k}.png")
        hr.resize((16, 12), Image.BICUBIC).save(pairs / "lr" / f"{k}.png")
    src = make_hr(tmp_path / "hr", n=1)
    dst = tmp_path / "out"
    run_build_trainset(job(src, dst, pairs=str(pairs), preset="realesrgan"))
    rows = [r for t in shard_bytes(dst).values() for r in t]
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    assert len(by_source["official_pairs"]) == 2 and len(by_source["official_pairs_deg"]) == 2
    assert all(json.loads(r["degradation"])["branch"] == "official" for r in by_source["official_pairs"])
    lr = np.asarray(Image.open(io.BytesIO(by_source["official_pairs"][0]["lr_png"])))
    assert lr.shape == (8, 8, 3)


def test_s3_end_to_end(ray_local, tmp_path, s3, s3_endpoint):
    s3.create_bucket(Bucket="hrdata")
    for k in range(3):
        buf = io.BytesIO()
        rng_image(48, 40, k).save(buf, "PNG")
        s3.put_object(Bucket="hrdata", Key=f"lsdir/0001000/{k}.png", Body=buf.getvalue())
    j = job("s3://hrdata/lsdir", "s3://hrdata/train", storage={"endpoint_url": s3_endpoint})
    summary = run_build_trainset(j)
    assert summary["processed"]["ok"] == 3
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="hrdata", Prefix="train/")["Contents"]]
    assert any(k.startswith("train/shard-") for k in keys) and "train/dataset_card.json" in keys


def test_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="unknown sources"):
        job(tmp_path, tmp_path / "o", mix={"flickr": 1})
    with pytest.raises(ValueError, match="unknown degradation preset"):
        run_build_trainset(job(tmp_path, tmp_path / "o", preset="nope"))
    with pytest.raises(FileNotFoundError):
        run_build_trainset(job(tmp_path / "missing", tmp_path / "o"))


def test_prompts_from_a_configured_tagger(ray_local, tmp_path, tiny_model):
    src = make_hr(tmp_path / "hr", n=3)
    dst = tmp_path / "out"
    run_build_trainset(job(src, dst, ram=tiny_model.ram, ram_config="tiny", ram_tag_list=tiny_model.ram_tag_list,
                           ram_thresholds=tiny_model.ram_thresholds))
    rows = [r for t in shard_bytes(dst).values() for r in t]
    assert len(rows) == 3 and all(r["prompt"].endswith(",") for r in rows)
    assert any(len(r["prompt"]) > 1 for r in rows)
