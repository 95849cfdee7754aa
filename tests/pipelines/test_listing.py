"""Listing, output keys, resume rules and planning as Ray tasks; storage error classification."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cluster.lease import DstLease
from cluster.storage import StorageConfig, error_code
from tests.support.inputs import rng_image
from pipelines.upscale.job import UpscaleJob
from pipelines.upscale.listing import list_inputs, merge_bucket
from pipelines.upscale.pieces import bucket_of
from pipelines.cli import app
from pipelines.upscale.manifest import SCHEMA, to_table
from pipelines.upscale.outputs import latest_rows, read_run_manifest
from pipelines.upscale.run import make_plan, plan_pools
from srmodel import get_preset
from srmodel.sampling.seeds import image_id_from_uri

S = StorageConfig()


def job(src, dst, **kw):
    return UpscaleJob.model_validate({"src": str(src), "dst": str(dst), "model": get_preset("tiny").model_dump(mode="json"), **kw})


def test_same_stem_different_extension_gets_distinct_outputs(tmp_path):
    rng_image(8, 8).save(tmp_path / "cat.jpg")
    rng_image(8, 8).save(tmp_path / "cat.png")
    rng_image(8, 8).save(tmp_path / "dog.png")
    keys = list_inputs(str(tmp_path), str(tmp_path / "out"), S, "png").column("dst_key").to_pylist()
    assert len(set(keys)) == 3 and "dog.png" in keys
    assert all(k.startswith("cat-") for k in keys if k != "dog.png")


def test_resume_finds_outputs_whose_names_clashed(ray_local, tmp_path):
    """cat.jpg and cat.png write cat-<id>.png; the done set must meet them in the bucket they were listed in."""
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for name in ("cat.jpg", "cat.png", "dog.png", "emu.png"):
        rng_image(8, 8).save(src / name)
    j = job(src, dst, plan_buckets=8)
    listing = list_inputs(str(src), str(dst), S, "png").to_pylist()
    assert sum(r["dst_key"].startswith("cat-") for r in listing) == 2
    _fake_manifest(dst, [_row(r, dst, params=j.params_hash()) for r in listing])
    assert make_plan(j, write=False).to_process == 0, "every image done, clashing names included"


def test_buckets_keep_clashing_keys_together_and_dedupe_uris():
    uris = [f"file:///d/{(i % 100) // 2}.{'jpg' if i % 2 else 'png'}" for i in range(200)]  # 100 distinct, clashing stems
    keys = [u.rsplit("/", 1)[1].split(".")[0] + ".png" for u in uris]
    table = pa.table({"image_id": [image_id_from_uri(u) for u in uris], "src_uri": uris, "dst_key": keys})
    ids = [bucket_of(k, 7) for k in keys]
    parts = [table.filter(pa.array([i == k for i in ids])) for k in range(7)]
    assert sum(len(p) for p in parts) == 200
    merged = [merge_bucket([p]) for p in parts]
    assert sum(len(m) for m in merged) == 100, "one row per distinct URI"
    out = [k for m in merged for k in m.column("dst_key").to_pylist()]
    assert len(out) == len(set(out)) == 100, "clashing output keys met in one bucket and were made distinct"


def test_list_file_duplicates_relative_paths(ray_local, tmp_path, monkeypatch):
    rng_image(8, 8).save(tmp_path / "a.png")
    lst = tmp_path / "list.txt"
    lst.write_text("a.png\na.png\n# comment\n")
    monkeypatch.chdir(tmp_path)
    plan = make_plan(job(lst, tmp_path / "out"), write=False)
    assert plan.total == 1 and plan.sample == [f"file://{tmp_path}/a.png"]
    lst.write_text("a.png\nb.png\n")
    plan = make_plan(job(lst, tmp_path / "out"), write=False)
    assert plan.total == 2 and not plan.listing_cached, "a list file is read afresh every run"


def test_folder_listing_is_sharded_cached_until_relist_and_skips_dst(ray_local, tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    for k in range(6):
        rng_image(8, 8, k).save(src / ("sub" if k % 2 else ".") / f"{k}.png")
    rng_image(8, 8).save(src / "sub" / "deeper" / "x.jpg")
    (src / "out").mkdir()
    rng_image(8, 8).save(src / "out" / "old.png")  # an earlier output inside SRC
    j = job(src, src / "out", plan_buckets=3, relist=False)
    plan = make_plan(j)
    assert plan.total == plan.to_process == 7 and not plan.listing_cached and plan.buckets == 3
    meta = json.loads((src / "out" / "_state" / "listing.json").read_text())
    shards = sorted((src / "out" / "_state" / "listing" / meta["listing_id"]).glob("part-*.parquet"))
    assert len(shards) == 3 and sum(pq.read_metadata(p).num_rows for p in shards) == 7
    assert all("/out/" not in u for p in shards for u in pq.read_table(p).column("src_uri").to_pylist())
    rng_image(8, 8).save(src / "new.png")
    assert make_plan(j).total == 7 and make_plan(j).listing_cached
    again = make_plan(j.model_copy(update={"relist": True}))
    assert again.total == 8 and not again.listing_cached and again.listed_at
    assert not (src / "out" / "_state" / "listing" / meta["listing_id"]).exists(), "the old listing is removed"
    (src / "newer.png").write_bytes((src / "new.png").read_bytes())
    default = make_plan(j.model_copy(update={"relist": None}))
    assert default.total == 9 and not default.listing_cached, "local folders are listed again by default"


def _fake_manifest(dst, rows, run="r1"):
    d = dst / "_manifest" / f"run={run}"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(rows), d / f"part-{len(list(d.iterdir()))}.parquet")


def _row(listing_row, dst, status="ok", params="p", when=0):
    import datetime as dt

    return {"image_id": listing_row["image_id"], "src_uri": listing_row["src_uri"], "status": status,
            "params_hash": params, "dst_uri": f"file://{dst}/{listing_row['dst_key']}" if status == "ok" else None,
            "timings_ms": {}, "finished_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=when)}


def test_resume_anti_join_in_ray_and_limit(ray_local, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for k in range(10):
        rng_image(8, 8, k).save(src / f"{k}.png")
    j = job(src, dst, plan_buckets=4)
    listing = list_inputs(str(src), str(dst), S, "png").to_pylist()
    p = j.params_hash()
    # 4 done with these settings, 1 done with other settings, 1 failed: 6 remain
    _fake_manifest(dst, [_row(r, dst, params=p) for r in listing[:4]] + [_row(listing[4], dst, params="other"),
                                                                          _row(listing[5], dst, status="error", params=p)])
    plan = make_plan(j)
    assert (plan.total, plan.to_process, plan.skipped) == (10, 6, 4)
    todo = pa.concat_tables([pq.read_table(u) for u in plan.todo_uris])
    assert sorted(todo.column("image_id").to_pylist()) == sorted(r["image_id"] for r in listing[4:])
    limited = make_plan(j.model_copy(update={"limit": 2}), write=False)
    assert limited.to_process == 2 and limited.skipped == 4


def test_compaction_keeps_the_latest_row_and_resume_reads_both_layouts(ray_local, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for k in range(6):
        rng_image(8, 8, k).save(src / f"{k}.png")
    j = job(src, dst, plan_buckets=2)
    listing = list_inputs(str(src), str(dst), S, "png").to_pylist()
    p = j.params_hash()
    old = dst / "_manifest" / "run=a"  # a part from before the tags/notes columns existed
    old.mkdir(parents=True)
    pq.write_table(to_table([_row(r, dst, status="error", params=p, when=0) for r in listing]).drop_columns(["tags", "notes"]),
                   old / "part-0.parquet")
    for i, r in enumerate(listing[:3]):
        _fake_manifest(dst, [_row(r, dst, params=p, when=10 + i)], run="b")
    assert make_plan(j, write=False).to_process == 3
    with DstLease(str(dst), S):  # a run is writing into DST: compaction waits its turn
        held = CliRunner().invoke(app, ["manifest", "compact", str(dst), "--rows-per-file", "4"])
    assert held.exit_code == 3 and "lease" in held.output.lower(), held.output
    wrong = CliRunner().invoke(app, ["manifest", "compact", str(tmp_path / "nowhere")])
    assert wrong.exit_code == 3 and "has no manifest" in " ".join(wrong.output.split()), wrong.output
    done = CliRunner().invoke(app, ["manifest", "compact", str(dst), "--rows-per-file", "4"])
    assert done.exit_code == 0, done.output
    out = json.loads(done.stdout)
    # Per run folder (issue 19: no global shuffle, every row keeps its run): run=a's one old-schema part is
    # rewritten in today's schema, run=b's three parts become one.
    assert out == {"files_before": 4, "files_after": 2, "rows_before": 9, "rows_after": 9}, out
    parts = sorted((dst / "_manifest").rglob("*.parquet"))
    assert [p.parent.name for p in parts] == ["run=a", "run=b"] and all("compacted" in p.name for p in parts)
    rows = latest_rows(read_run_manifest(str(dst), S))
    assert len(rows) == 6 and sum(r["status"] == "ok" for r in rows) == 3, "latest row per image and params_hash"
    again = CliRunner().invoke(app, ["manifest", "compact", str(dst), "--rows-per-file", "4"])
    assert json.loads(again.stdout)["files_after"] == 2 and sorted((dst / "_manifest").rglob("*.parquet")) == parts, \
        "compacted parts in today's schema stay as they are"
    assert make_plan(j, write=False).to_process == 3, "resume reads compacted parts"
    _fake_manifest(dst, [_row(listing[3], dst, params=p, when=99)], run="c")
    assert make_plan(j, write=False).to_process == 2, "...and new run folders beside them"
    assert pq.read_table(next((dst / "_manifest").rglob("*.parquet"))).schema.equals(SCHEMA)


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


def test_storage_errors_are_classified_by_code_not_message():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def wrapped(err):  # what s3fs raises: an OSError whose cause is the botocore error
        try:
            raise OSError("IMG_5003.jpg: 500 problem") from err
        except OSError as e:
            return e

    assert error_code(wrapped(client_error("SlowDown", 503))) == "SlowDown"
    assert error_code(client_error("", 502)) == "HTTP502" and error_code(EndpointConnectionError(endpoint_url="http://x")) == "EndpointConnectionError"
    assert error_code(wrapped(client_error("AccessDenied", 403))) == "AccessDenied", "the key's digits are not a status"
    assert error_code(OSError("cannot read IMG_5003.jpg: 503")) == "OSError" and error_code(FileNotFoundError("IMG_500.jpg")) == "FileNotFoundError"
    opts = StorageConfig(max_attempts=3, retry_mode="adaptive").s3_options()
    assert opts["config_kwargs"]["retries"] == {"mode": "adaptive", "max_attempts": 3}
    from cluster.storage import filesystem

    # s3fs's own retry loops are off: botocore's attempts are the only request retries (no stacking).
    assert filesystem("s3://b/k", StorageConfig(body_retries=4, endpoint_url="http://127.0.0.1:9"))[0].retries == 1


def test_executions_are_groups_of_whole_shards_bounded_in_images_and_share_the_limit():
    """A run is a loop of Ray Data executions over groups of todo shards (Ray Data's per-block records on the
    driver live as long as an execution): at most N images a group unless one shard is larger; --limit spans
    the groups."""
    from dataclasses import replace

    from pipelines.upscale.run import Plan, executions

    plan = Plan(total=12, to_process=10, skipped=2, listing_cached=False, todo_uris=list("abcd"),
                todo_counts=[4, 3, 2, 1], run_id="r")
    assert [(g.todo_uris, g.to_process) for g in executions(plan, 5)] == [(["a"], 4), (["b", "c"], 5), (["d"], 1)]
    assert [(g.todo_uris, g.to_process) for g in executions(plan, 10**6)] == [(list("abcd"), 10)]
    assert [g.todo_uris for g in executions(plan, 1)] == [["a"], ["b"], ["c"], ["d"]]  # a shard is never split
    assert all(g.run_id == "r" and g.skipped == 2 for g in executions(plan, 1))
    limited = replace(plan, to_process=5)  # --limit 5
    assert [(g.todo_uris, g.to_process) for g in executions(limited, 3)] == [(["a"], 4), (["b"], 1)]
    assert executions(replace(plan, todo_uris=[], todo_counts=[], to_process=0), 5) == []


@pytest.mark.parametrize("hint", [None, 7, 400])
def test_a_piece_gives_every_bucket_its_rows_once_whatever_the_bucket_count(tmp_path, hint):
    """Pieces are bucketed before B is known (hint None: a folder's count is known only once listed)."""
    from pipelines.upscale.pieces import bucket_of, read_spans, spans, write_piece

    keys = [f"photos/{i:05d}.png" for i in range(3000)]
    table = pa.table({"image_id": [str(i) for i in range(3000)], "dst_key": keys})
    piece = write_piece(str(tmp_path / "p.arrow"), table, keys, S, hint)
    size = (tmp_path / "p.arrow").stat().st_size
    for buckets in (1, 3, 7, 400, 4096):
        seen, read = [], 0
        for k in range(buckets):
            ranges = spans([(str(tmp_path / "p.arrow"), piece)], k, buckets)
            read += sum(end - start for _, start, end in ranges)
            part = read_spans(ranges, table.schema, S, k, buckets)
            assert part.schema == table.schema
            assert {bucket_of(key, buckets) for key in part.column("dst_key").to_pylist()} <= {k}
            seen += part.column("dst_key").to_pylist()
        assert sorted(seen) == keys, f"B={buckets}: every row exactly once"
        if buckets == hint:
            assert read <= size, "with the bucket count known, each bucket reads only its own batches"


def test_what_a_planning_task_returns_to_the_driver_does_not_grow_with_its_rows(tmp_path):
    """Issue 19: list/done tasks returned B tables each (num_returns=B), ~10^5 objects held by the driver at
    T=256, B=400. A task now stores its rows as one piece and returns counts and offsets of fixed size."""
    import pickle

    from pipelines.upscale.listing import list_pieces

    src = tmp_path / "src"
    sizes = {}
    for n in (10, 4000):
        folder = src / str(n)
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{i:05d}.png").write_bytes(b"")
        ctx = {"src": str(src), "dst_path": str(tmp_path / "out"), "format": "png",
               "storage": S.model_dump(mode="json"), "cwd": str(tmp_path)}
        (_, out), = list_pieces([("tree", str(folder))], ctx, str(tmp_path / f"list-{n}.arrow"), 400)
        assert out["rows"] == n
        sizes[n] = len(pickle.dumps(out))
    assert abs(sizes[4000] - sizes[10]) <= 8 and max(sizes.values()) <= 40_000, sizes


def test_a_list_task_stores_a_flat_folder_as_pieces_of_bounded_rows(tmp_path):
    """Issue 19: a local flat folder is one unit, read by one task (a directory is read in order), which held all
    its rows (10^8 files: tens of GB). The task now streams it into pieces of at most piece_rows rows."""
    import pyarrow as pa

    from pipelines.upscale import listing as L
    from pipelines.upscale.pieces import read_spans, spans

    folder = tmp_path / "src"
    folder.mkdir()
    for i in range(2500):
        (folder / f"{i:05d}.png").write_bytes(b"")
    (folder / "notes.txt").write_bytes(b"")
    ctx = {"src": str(folder), "dst_path": str(tmp_path / "out"), "format": "png",
           "storage": S.model_dump(mode="json"), "cwd": str(tmp_path)}
    held = []
    chunks = L._chunks_of_unit

    def spy(unit, ctx, rows):
        for uris, keys in chunks(unit, ctx, rows):
            held.append(len(uris))
            yield uris, keys

    L._chunks_of_unit = spy
    try:
        pieces = L.list_pieces([("files", str(folder))], ctx, str(tmp_path / "list-00000.arrow"), None, piece_rows=1000)
    finally:
        L._chunks_of_unit = chunks
    assert [p["rows"] for _, p in pieces] == [1000, 1000, 500] and max(held) <= 1000
    buckets = 7
    rows = pa.concat_tables([read_spans(spans(pieces, k, buckets), L.LISTING_SCHEMA, S, k, buckets)
                             for k in range(buckets)])
    assert sorted(rows.column("dst_key").to_pylist()) == [f"{i:05d}.png" for i in range(2500)]


def _moto_keys(bucket: str, keys: list[str]) -> None:
    """Many keys straight into moto's in-process store (20,000 PUTs over HTTP take minutes on 2 cores)."""
    from moto.s3.models import s3_backends

    backend = s3_backends["123456789012"]["global"]
    for key in keys:
        backend.put_object(bucket, key, b"")


def test_a_flat_s3_prefix_is_listed_in_key_ranges_by_several_tasks(ray_local, s3, s3_endpoint):
    """Issue 19: a flat prefix was listed in full by one task (fs.ls keeping a dict per key), then again by the
    "files" unit. It is now split into key ranges by probing pages, each listed by its own task, each key once."""
    from pipelines.upscale.listing import _rows_of_unit, discover_units, group_units

    s3.create_bucket(Bucket="src")
    names = [f"flat/{i:05d}.png" for i in range(20_000)] + ["flat/sub/a.png", "flat/zz.txt", "flat/out/done.png"]
    _moto_keys("src", names)
    storage = StorageConfig(endpoint_url=s3_endpoint)
    units, known = discover_units("s3://src/flat", "s3://src/flat/out", storage, max_units=4)
    groups = group_units(units, 4)
    assert known is None and len(units) >= 4 and len(groups) == 4, units
    ctx = {"src": "s3://src/flat", "dst_path": "src/flat/out", "format": "png",
           "storage": storage.model_dump(mode="json"), "cwd": "/"}
    per_group = [[u for unit in g for u in _rows_of_unit(unit, ctx)[0]] for g in groups]
    assert all(len(g) > 1000 for g in per_group), [len(g) for g in per_group]
    listed = sorted(u for g in per_group for u in g)
    want = sorted(f"s3://src/{n}" for n in names if n.endswith(".png") and not n.startswith("flat/out/"))
    assert listed == want, "every image key once; DST under SRC and other files left out"
    j = job("s3://src/flat", "s3://src/flat/out", storage={"endpoint_url": s3_endpoint}, plan_tasks=4)
    plan = make_plan(j, write=False)
    assert plan.to_process == 20_001 and plan.buckets == 1, "B from the count (20,001 rows: one bucket)"


def test_key_range_split_keeps_a_key_that_equals_a_split_prefix(s3, s3_endpoint, monkeypatch):
    """cat.png beside cat.png.old.png: splitting prefix "cat.png" into children loses the key "cat.png" itself."""
    import pipelines.upscale.listing as L

    monkeypatch.setattr(L, "SPLIT_PAGE", 1)  # split every prefix holding more than one key
    s3.create_bucket(Bucket="src")
    names = ["d/cat.png", "d/cat.png.old.png", "d/cat.png.x.png", "d/b.png", "d/c\U0010ffffz.png", "d/c\U0010ffff.png"]
    _moto_keys("src", names)
    storage = StorageConfig(endpoint_url=s3_endpoint)
    units, _ = L.discover_units("s3://src/d", "s3://dst/out", storage, max_units=64)
    assert ("keys", "src/d", "cat.png", True) in units
    ctx = {"src": "s3://src/d", "dst_path": "dst/out", "format": "png", "storage": storage.model_dump(mode="json"),
           "cwd": "/"}
    listed = sorted(u for unit in units for u in L._rows_of_unit(unit, ctx)[0])
    assert listed == sorted(f"s3://src/{n}" for n in names)


def test_planning_pieces_are_removed_and_only_stale_ones_of_other_runs(ray_local, tmp_path):
    import datetime as dt

    from pipelines.upscale.run import _remove_stale_plans

    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    rng_image(8, 8).save(src / "a.png")
    plans = dst / "_state" / "plan"
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for name in ("20200101T000000Z-0a0a0a", f"{now}-1b1b1b", "not-a-run"):  # a crashed planner; a dry run now
        (plans / name).mkdir(parents=True)
        (plans / name / "list-00000.arrow").write_bytes(b"x")
    plan = make_plan(job(src, dst))
    assert plan.to_process == 1
    assert sorted(p.name for p in plans.iterdir()) == sorted([f"{now}-1b1b1b", "not-a-run"]), \
        "this run's pieces and a day-old run's are gone; a planning run of now and foreign folders stay"
    _remove_stale_plans(str(dst), S, age_s=0)
    assert sorted(p.name for p in plans.iterdir()) == ["not-a-run"]


def test_latest_rows_in_arrow_match_the_row_by_row_rule():
    """Issue 19: report/evaluate made a Python dict per manifest row to find each image's latest row. The
    Arrow version must keep the rule: latest finished_at (null earliest), the last in manifest order among
    equals, images in order of first appearance."""
    import datetime as dt
    import random

    from pipelines.upscale.outputs import latest_rows

    def reference(rows):
        latest = {}
        for r in rows:
            old = latest.get(r["image_id"])
            when = r["finished_at"].timestamp() if r["finished_at"] else float("-inf")
            if old is None or when >= (old["finished_at"].timestamp() if old["finished_at"] else float("-inf")):
                latest[r["image_id"]] = r
        return list(latest.values())

    rng = random.Random(0)
    base = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for _ in range(20):
        rows = [{"image_id": rng.choice(["a", "b", "c", "d", None]), "status": rng.choice(["ok", "error"]),
                 "finished_at": rng.choice([None, base, base + dt.timedelta(seconds=rng.randint(0, 3))]),
                 "k": k} for k in range(rng.randint(1, 40))]
        table = pa.Table.from_pylist(rows, schema=pa.schema([("image_id", pa.string()), ("status", pa.string()),
                                                              ("finished_at", pa.timestamp("us", tz="UTC")),
                                                              ("k", pa.int64())]))
        assert [r["k"] for r in latest_rows(table)] == [r["k"] for r in reference(rows)]
    assert latest_rows(table.slice(0, 0)) == []
