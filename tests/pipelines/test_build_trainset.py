"""`build-trainset`: shards, schema, bad inputs, determinism across worker counts, resume, pairs, S3."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.support.inputs import rng_image
from pipelines.build_trainset import SHARD_SCHEMA, TrainsetJob, plan, run_build_trainset


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
    (src / "broken.png").unlink()  # a shard with an error row is retried on every run; this test is about the others
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


# ---------------------------------------------------------------- settings that stick, shards that are honest


def test_another_seed_into_the_same_dst_is_refused(ray_local, tmp_path):
    src = make_hr(tmp_path / "hr", n=3)
    dst = tmp_path / "out"
    run_build_trainset(job(src, dst, seed=1))
    stored = json.loads((dst / "_state" / "settings.json").read_text())
    assert stored["settings_hash"] == job(src, dst, seed=1).settings_hash()
    assert all(pq.read_schema(p).metadata[b"settings_hash"] == stored["settings_hash"].encode()
               for p in dst.glob("shard-*.parquet"))
    before = shard_bytes(dst)
    with pytest.raises(ValueError, match=r"other settings \(seed: 1 -> 2\); use another DST"):
        run_build_trainset(job(src, dst, seed=2))
    assert shard_bytes(dst) == before and json.loads((dst / "dataset_card.json").read_text())["seed"] == 1
    # what does not shape the data (workers, limit, where Ray runs) may change
    run_build_trainset(job(src, dst, seed=1, workers=1))


def test_shards_depend_on_the_unit_not_its_position(ray_local, tmp_path):
    """Adding a file rebuilds only the shard it lands in; every other shard keeps its bytes and is skipped."""
    src = make_hr(tmp_path / "hr", n=6)
    (src / "broken.png").unlink()  # its shard would be retried (error rows), which is not what this test is about
    dst = tmp_path / "out"
    run_build_trainset(job(src, dst, shards=8))
    before = shard_bytes(dst)
    rng_image(56, 48, 77).save(src / "000_new.png")  # sorts first: every later position would shift
    planned = plan(job(src, dst, shards=8))
    assert planned["shards_to_build"] == 1 and planned["crops_to_build"] >= 1
    summary = run_build_trainset(job(src, dst, shards=8))
    assert summary["shards_skipped"] == summary["shards"] - 1
    after = shard_bytes(dst)
    changed = [name for name in after if after[name] != before.get(name)]
    assert len(changed) == 1 and any(r["src_uri"].endswith("000_new.png") for r in after[changed[0]])


def test_partial_and_failed_shards_are_rebuilt(ray_local, tmp_path):
    src = make_hr(tmp_path / "hr", n=6)
    dst = tmp_path / "out"
    first = run_build_trainset(job(src, dst, shards=1, limit=3))  # one shard, 3 of its 8 units
    assert sum(first["processed"].values()) == 3
    assert plan(job(src, dst, shards=1))["shards_to_build"] == 1, "a --limit run's partial shard is not done"
    full = run_build_trainset(job(src, dst, shards=1))
    assert full["shards_skipped"] == 0 and full["processed"] == {"ok": 6, "error": 1, "skipped": 1}
    # the shard holding broken.png has an error row: a re-run retries it, and once the file is fixed it is done
    assert plan(job(src, dst, shards=1))["shards_to_build"] == 1
    rng_image(48, 40, 50).save(src / "broken.png")
    again = run_build_trainset(job(src, dst, shards=1))
    assert again["processed"] == {"ok": 7, "error": 0, "skipped": 1}
    assert plan(job(src, dst, shards=1))["shards_to_build"] == 0


def test_dry_run_writes_nothing(tmp_path):
    src = make_hr(tmp_path / "hr", n=4)
    dst = tmp_path / "out"
    planned = plan(job(src, dst, mix={"lsdir": 2}))
    assert planned["crops"] == 12 and planned["by_source"] == {"lsdir": 12} and planned["shards_done"] == 0
    assert planned["crops_to_build"] == 12 and not dst.exists()


def test_branch_counts_and_the_small_trial_note():
    from collections import Counter

    from pipelines.build_trainset import branch_note

    j = TrainsetJob(src="/x", dst="/y")
    note = branch_note(j, Counter({"lsdir/clean": 3, "official_pairs/official": 2}))
    assert "all 3 degraded-source crops drew the clean" in note and "group of 10" in note and "realesrgan" in note
    assert branch_note(j, Counter({"lsdir/clean": 3, "lsdir/degrade": 1})) is None


def test_cli_progress_dry_run_and_fail_on_error(ray_local, tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    src = make_hr(tmp_path / "hr", n=3)
    dst = tmp_path / "out"
    args = ["build-trainset", str(src), str(dst), "--crop", "32", "--shards", "2", "--config", str(tmp_path / "c.yaml")]
    (tmp_path / "c.yaml").write_text("min_pixels: 1200\nmin_file_bytes: 0\n")
    out = CliRunner().invoke(app, [*args, "--dry-run"])
    assert out.exit_code == 0 and json.loads(out.stdout)["crops"] == 5 and not dst.exists()
    out = CliRunner().invoke(app, [*args, "--fail-on-error"])
    assert out.exit_code == 1, out.output
    # 5 crops hashed into 2 shards by unit id (which holds the tmp path): now and then all land in one (1 in 16)
    import re

    assert re.search(r"building [12] shard\(s\) of 5 crop\(s\)", out.stderr), out.stderr
    assert "5/5 crops" in out.stderr and "1 failed" in out.stderr
    summary = json.loads(out.stdout)
    assert summary["processed"] == {"ok": 3, "error": 1, "skipped": 1} and sum(summary["by_branch"].values()) == 3
    # The small-trial note: present exactly when every drawn branch was clean, in the summary, card and terminal.
    drawn = [b for b in summary["by_branch"] if not b.endswith("/official")]
    all_clean = bool(drawn) and not any(b.endswith("/degrade") for b in drawn)
    card = json.loads((dst / "dataset_card.json").read_text())
    assert card["by_branch"] == summary["by_branch"] and card.get("note") == summary.get("note")
    assert bool(summary.get("note")) == all_clean == ("note:" in out.stderr)
    assert "clean (bicubic-only)" in " ".join(CliRunner().invoke(app, ["build-trainset", "--help"]).output.split())
    out = CliRunner().invoke(app, args)  # the failed shard is retried; without --fail-on-error the exit is 0
    assert out.exit_code == 0 and json.loads(out.stdout)["processed"]["error"] == 1
    out = CliRunner().invoke(app, [*args, "--seed", "3"])
    assert out.exit_code == 3 and "other settings (seed: 0 -> 3)" in out.stderr
