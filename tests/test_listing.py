"""Listing, output keys, resume rules and planning, without Ray."""

import pytest

from cluster.storage import StorageConfig
from inputs import rng_image
from pipelines.job import UpscaleJob
from pipelines.listing import list_inputs
from pipelines.upscale import make_plan, plan_pools
from srmodel import get_preset

S = StorageConfig()


def job(src, dst, **kw):
    return UpscaleJob.model_validate({"src": str(src), "dst": str(dst), "model": get_preset("tiny").model_dump(mode="json"), **kw})


def test_same_stem_different_extension_gets_distinct_outputs(tmp_path):
    rng_image(8, 8).save(tmp_path / "cat.jpg")
    rng_image(8, 8).save(tmp_path / "cat.png")
    rng_image(8, 8).save(tmp_path / "dog.png")
    table, _ = list_inputs(str(tmp_path), str(tmp_path / "out"), S, "png")
    keys = table.column("dst_key").to_pylist()
    assert len(set(keys)) == 3 and "dog.png" in keys
    assert all(k.startswith("cat-") for k in keys if k != "dog.png")


def test_list_file_duplicates_relative_paths_and_no_caching(tmp_path, monkeypatch):
    rng_image(8, 8).save(tmp_path / "a.png")
    lst = tmp_path / "list.txt"
    lst.write_text("a.png\na.png\n# comment\n")
    monkeypatch.chdir(tmp_path)
    table, cached = list_inputs(str(lst), str(tmp_path / "out"), S, "png")
    assert table.column("src_uri").to_pylist() == [f"file://{tmp_path}/a.png"]
    lst.write_text("a.png\nb.png\n")
    table, cached = list_inputs(str(lst), str(tmp_path / "out"), S, "png")
    assert len(table) == 2 and cached is False, "a list file is read afresh every run"


def test_folder_listing_is_cached_until_relist_and_skips_dst_inside_src(tmp_path):
    rng_image(8, 8).save(tmp_path / "a.png")
    (tmp_path / "out").mkdir()
    rng_image(8, 8).save(tmp_path / "out" / "a.png")  # an earlier output
    table, cached = list_inputs(str(tmp_path), str(tmp_path / "out"), S, "png")
    assert table.column("dst_key").to_pylist() == ["a.png"] and not cached
    rng_image(8, 8).save(tmp_path / "b.png")
    table, cached = list_inputs(str(tmp_path), str(tmp_path / "out"), S, "png", relist=False)
    assert len(table) == 1 and cached
    table, cached = list_inputs(str(tmp_path), str(tmp_path / "out"), S, "png", relist=True)
    assert len(table) == 2 and not cached


def test_limit_counts_images_still_to_do(tmp_path):
    for k in range(5):
        rng_image(8, 8, k).save(tmp_path / f"{k}.png")
    plan = make_plan(job(tmp_path, tmp_path / "out", limit=2), save_listing=False)
    assert len(plan.todo) == 2 and plan.skipped == 0


def test_output_settings_are_part_of_the_resume_key(tmp_path):
    a = job(tmp_path, tmp_path / "o")
    assert a.params_hash() != job(tmp_path, tmp_path / "o", format="webp").params_hash()
    assert a.params_hash() != job(tmp_path, tmp_path / "o", base_seed=1).params_hash()
    assert a.params_hash() == job(tmp_path, tmp_path / "o", limit=3).params_hash()


def test_pools_that_do_not_fit_the_gpus_are_refused(tmp_path):
    ok = plan_pools(job(tmp_path, tmp_path / "o"), gpus=4)  # fused layout: one whole-GPU actor per GPU
    assert ok["sr_actors"] == ok["sr_actors_max"] == 4 and ok["sr_gpus"] == 1 and ok["semantic_actors"] == 0
    with pytest.raises(ValueError, match="ask for"):
        plan_pools(job(tmp_path, tmp_path / "o", resources={"sr_actors": 6}), gpus=4)
    cpu = plan_pools(job(tmp_path, tmp_path / "o"), gpus=0)
    assert cpu["sr_gpus"] == 0 and cpu["semantic_gpus"] == 0


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    j = job("in", "out", cache_semantic="cache")
    assert j.src == str(tmp_path / "in") and j.dst == str(tmp_path / "out") and j.cache_semantic == str(tmp_path / "cache")
    assert job("s3://b/in", "s3://b/out").src == "s3://b/in"
    with pytest.raises(Exception, match="extra"):
        UpscaleJob.model_validate({"src": "a", "dst": "b", "model": get_preset("tiny").model_dump(), "bogus": 1})
