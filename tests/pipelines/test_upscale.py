"""`ugcsr upscale` on local Ray: local folders and S3 (moto), every bad/unusual input, resume, dry run."""

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.support.inputs import rng_image, write_inputs
from pipelines.upscale.job import UpscaleJob
from pipelines.upscale.manifest import SCHEMA, read_manifest
from pipelines.upscale.run import dry_run, run_upscale
from srmodel import get_preset




def job(src, dst, scale=4, **kw) -> UpscaleJob:
    model = get_preset("tiny").model_dump(mode="json")
    model["sampler"].update(upscale=scale, steps=2, process_size=32 if scale == 1 else 64)
    return UpscaleJob.model_validate({"src": str(src), "dst": str(dst), "model": model, **kw})


def rows_by_name(dst) -> dict:
    table = read_manifest(str(dst), UpscaleJob.model_fields["storage"].default)
    return {r["src_uri"].split("/badin/")[-1]: r for r in table.to_pylist()}


@pytest.mark.parametrize("scale", [4, 1])
def test_every_bad_and_unusual_input_in_one_run(ray_local, tmp_path, scale):
    expect = write_inputs(tmp_path / "badin")
    dst = tmp_path / "out"
    summary = run_upscale(job(tmp_path / "badin", dst, scale, max_pixels=50_000))
    rows = rows_by_name(dst)
    assert sorted(rows) == sorted(expect), "the manifest accounts for every input exactly once"
    for name, (kind, value) in expect.items():
        row = rows[name]
        assert row["status"] == kind, (name, row)
        if kind == "error":
            assert row["error_type"] == value and row["stage"] == "decode" and name in row["error_message"]
            assert row["dst_uri"] is None
        else:
            w, h = value
            out = Image.open(io.BytesIO(Path(row["dst_uri"].removeprefix("file://")).read_bytes()))
            assert out.size == (w * scale, h * scale) == (row["dst_width"], row["dst_height"]), name
            assert row["src_width"] == w and row["src_height"] == h
            assert row["seed"] is not None and row["prompt"].endswith("ultra-realistic")
            # per-image prompts from the (tiny) RAM+DAPE tagger, built as released
            assert row["tags"] is not None and row["prompt"] == f"{row['tags']}, ," + get_preset("tiny").sampler.added_prompt
    assert "first of 3" in rows["anim.gif"]["notes"] and "alpha" in rows["rgba.png"]["notes"]
    # odd names are sanitised and stay inside DST
    written = [p for p in dst.rglob("*") if p.is_file() and "_manifest" not in p.parts and "_state" not in p.parts]
    assert all(dst in p.parents for p in written)
    assert summary["by_status"] == {"ok": 12, "error": 5}
    assert len({r["tags"] for r in rows.values() if r["status"] == "ok"}) > 1, "tags differ between images"
    assert summary["by_error_type"] == {"DecodeError": 5}
    run = summary["run_id"]
    for where in (run, "latest"):
        assert json.loads((dst / "_runs" / where / "summary.json").read_text())["by_status"] == summary["by_status"]
    # readable as it is, with the documented schema; _manifest/ holds only Parquet, one folder per run
    files = [p for p in (dst / "_manifest").rglob("*") if p.is_file()]
    assert files and all(p.suffix == ".parquet" and p.parent.name == f"run={run}" for p in files)
    assert pq.read_table(files[0]).schema.equals(SCHEMA)
    import pyarrow.dataset as pads

    assert pads.dataset(dst / "_manifest", partitioning="hive").to_table().num_rows == 17


def test_resume_skips_done_and_retries_the_rest(ray_local, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(4):
        rng_image(12 + k, 10, k).save(src / f"img{k}.png")
    (src / "broken.png").write_bytes(b"nope")
    dst = tmp_path / "out"
    first = run_upscale(job(src, dst, cache_semantic=str(tmp_path / "sem")))
    assert first["by_status"] == {"ok": 4, "error": 1}
    assert len(list((tmp_path / "sem").rglob("*.npz"))) == 4
    before = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.png")}

    second = run_upscale(job(src, dst, relist=False))  # local folders relist by default; reuse asked here
    assert second["by_status"] == {"skipped": 4, "error": 1}  # the failed one is retried, the rest skipped
    assert second["listing_reused"] is True
    assert {p.name: p.stat().st_mtime_ns for p in dst.glob("*.png")} == before

    changed = run_upscale(job(src, dst, **{}) .model_copy(update={"model": job(src, dst).model.model_copy(
        update={"sampler": job(src, dst).model.sampler.model_copy(update={"guidance_scale": 3.0})})}))
    assert changed["by_status"] == {"ok": 4, "error": 1}, "a pixel-affecting change reprocesses"
    table = read_manifest(str(dst), UpscaleJob.model_fields["storage"].default).to_pylist()
    for params in {r["params_hash"] for r in table}:
        oks = [r["image_id"] for r in table if r["params_hash"] == params and r["status"] == "ok"]
        assert len(oks) == len(set(oks)), "never two ok rows for one image and setting"
    # One summary per run, and a latest one: the resume runs did not overwrite the first run's statistics.
    runs = {p.parent.name: json.loads(p.read_text()) for p in (dst / "_runs").glob("*/summary.json")}
    assert set(runs) == {first["run_id"], second["run_id"], changed["run_id"], "latest"}
    assert runs[first["run_id"]]["by_status"] == {"ok": 4, "error": 1} and runs["latest"] == runs[changed["run_id"]]
    _every_reader_opens_the_manifest_folder(dst / "_manifest", rows=len(table))


def _every_reader_opens_the_manifest_folder(folder, rows: int) -> None:
    """`DST/_manifest/` holds only Parquet in hive `run=<id>/` folders: each reader opens it as one table."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads
    import ray

    assert {p.suffix for p in folder.rglob("*") if p.is_file()} == {".parquet"}
    assert pq.read_table(folder).num_rows == rows
    by_run = pads.dataset(folder, format="parquet", partitioning="hive").to_table()
    assert by_run.num_rows == rows and len(set(by_run.column("run").to_pylist())) == 3
    assert len(pd.read_parquet(folder)) == rows
    query = f"select count(*), count(distinct run) from read_parquet('{folder}/**/*.parquet', hive_partitioning = true)"
    assert duckdb.connect().execute(query).fetchall() == [(rows, 3)]
    assert ray.data.read_parquet(str(folder)).count() == rows


def test_progress_moves_per_batch_not_per_manifest_part(ray_local, tmp_path):
    """Parts are sized for readers (one part here); the progress hook still hears of every write batch."""
    src = tmp_path / "src"
    src.mkdir()
    for k in range(6):
        rng_image(12, 10, k).save(src / f"{k}.png")
    (src / "broken.png").write_bytes(b"nope")
    calls = []
    summary = run_upscale(job(src, tmp_path / "out", scale=1, manifest_rows_per_file=1024,
                              resources={"sr_batch": 1, "io_batch": 1}),
                          on_progress=lambda done, errors, total: calls.append((done, errors, total)))
    assert summary["manifest_parts"] == 1 and summary["by_status"] == {"ok": 6, "error": 1}
    assert calls[-1] == (7, 1, 7), "the last call gives the exact figures"
    assert any(0 < done < 7 for done, _, _ in calls), f"progress before the end: {calls}"
    assert [d for d, _, _ in calls] == sorted(d for d, _, _ in calls), "never backwards"


@pytest.mark.slow  # plans in Ray tasks
def test_dry_run_loads_no_model(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(3):
        rng_image(8, 8, k).save(src / f"{k}.png")
    import srmodel.stages

    monkeypatch.setattr(srmodel.stages, "load_upscaler", lambda *a, **k: pytest.fail("dry run loaded a model"))
    plan = dry_run(job(src, tmp_path / "out", limit=2))
    assert plan["images"] == 2 and plan["to_process"] == 2 and plan["to_skip"] == 0
    assert plan["pools"]["sr_actors"] >= 1
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


def test_s3_source_and_destination(ray_local, tmp_path, s3, s3_endpoint):
    s3.create_bucket(Bucket="src")
    s3.create_bucket(Bucket="dst")
    for k in range(3):
        buf = io.BytesIO()
        rng_image(10 + k, 8, k).save(buf, "PNG")
        s3.put_object(Bucket="src", Key=f"photos/a/{k}.png", Body=buf.getvalue())
    s3.put_object(Bucket="src", Key="photos/a/bad.jpg", Body=b"")
    storage = {"endpoint_url": s3_endpoint}
    summary = run_upscale(job("s3://src/photos", "s3://dst/out", storage=storage))
    assert summary["by_status"] == {"ok": 3, "error": 1}
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="dst", Prefix="out/")["Contents"])
    assert [k for k in keys if k.endswith(".png")] == ["out/a/0.png", "out/a/1.png", "out/a/2.png"]
    assert any(k.startswith(f"out/_manifest/run={summary['run_id']}/part-") for k in keys)
    assert "out/_runs/latest/summary.json" in keys and not [k for k in keys if "_manifest" in k and not k.endswith(".parquet")]
    img = Image.open(io.BytesIO(s3.get_object(Bucket="dst", Key="out/a/2.png")["Body"].read()))
    assert img.size == (48, 32)
    # a URI list with an object deleted after listing: an error row, the job goes on; rows naming another
    # bucket or a local file (readable by the cluster's identity) are refused, never read (docs/cluster.md)
    s3.create_bucket(Bucket="other")
    s3.put_object(Bucket="other", Key="secret.png", Body=s3.get_object(Bucket="src", Key="photos/a/1.png")["Body"].read())
    local = tmp_path / "local.png"
    rng_image(8, 8, 0).save(local)
    s3.put_object(Bucket="src", Key="list.txt", Body=f"s3://src/photos/a/0.png\ns3://src/photos/a/gone.png\n"
                  f"s3://other/secret.png\nfile://{local}\n".encode())
    summary = run_upscale(job("s3://src/list.txt", "s3://dst/out2", storage=storage))
    assert summary["by_status"] == {"ok": 1, "error": 3}
    table = read_manifest("s3://dst/out2", UpscaleJob.model_fields["storage"].default.model_copy(update=storage))
    bad = {r["src_uri"].rsplit("/", 1)[-1]: r for r in table.to_pylist() if r["status"] == "error"}
    assert bad["gone.png"]["stage"] == "read" and "gone.png" in bad["gone.png"]["error_message"]
    for name in ("secret.png", "local.png"):
        assert bad[name]["error_type"] == "RefusedSource" and "outside the allowed sources" in bad[name]["error_message"]
    assert "testing" not in json.dumps(table.to_pylist(), default=str), "no credentials in the manifest"


def test_a_run_whose_lease_is_taken_writes_nothing_more(ray_local, tmp_path):
    """Another run takes the DST lease after planning: every writer refuses, the run fails with LeaseLost,
    and no output, manifest part or summary of it appears; the other run's lease stays."""
    from cluster.lease import LeaseLost

    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for k in range(4):
        rng_image(12, 10, k).save(src / f"{k}.png")
    lease_file = dst / "_state" / "lease.json"

    def take_over(plan):
        record = json.loads(lease_file.read_text())
        lease_file.write_text(json.dumps({**record, "owner": "the other run", "run_id": "someone-else"}))

    with pytest.raises(LeaseLost, match="lost its DST lease"):
        run_upscale(job(src, dst, retries={"task_max_retries": 1}), on_plan=take_over)
    written = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert [p for p in written if not p.startswith("_state/")] == [], written
    assert json.loads(lease_file.read_text())["owner"] == "the other run"


def test_sr_tasks_take_a_model_batch_not_a_whole_read_block(ray_local, tmp_path):
    """Issue 19: Ray Data hands an actor whole blocks, so an SR task took a 32-row read block (8 model batches
    in one task: hour-long tails at x4, a retry redoing all 32). The pipeline re-blocks to the model batch."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from pipelines.upscale.run import Plan, build_dataset

    import re

    class Model:
        def __call__(self, batch):
            return batch

    def tasks(ds) -> int:
        stats = ds.map_batches(Model, batch_size=4, compute=ActorPoolStrategy(size=1), num_cpus=1).materialize().stats()
        return int(re.search(r"MapBatches\(Model\): (\d+) tasks executed", stats).group(1))

    # Like read_decode: a task that makes one 32-row block.
    one_block = ray.data.from_items([{"id": i} for i in range(32)], override_num_blocks=1).map_batches(
        lambda b: b, batch_size=32, num_cpus=0.25)
    assert tasks(one_block) == 1, "Ray Data: one task for the whole block, batch_size notwithstanding"
    assert tasks(one_block.repartition(target_num_rows_per_block=4)) == 8
    j = job(tmp_path, tmp_path / "out", resources={"sr_batch": 4, "io_batch": 32})
    plan = Plan(total=1, to_process=1, skipped=0, listing_cached=False, todo_uris=["x"], todo_counts=[1], run_id="r")
    pools = {"layout": "fused", "sr_actors": 1, "sr_actors_max": 1, "sr_gpus": 0, "sr_cpus": 1, "semantic_actors": 0,
             "semantic_gpus": 0, "semantic_cpus": 1, "io_cpus": 0.25, "cpus_max": 8}
    ops, op = [], build_dataset(j, plan, pools)._logical_plan.dag
    while op is not None:
        ops.append(op)
        op = op.input_dependencies[0] if op.input_dependencies else None
    names = [o.name for o in reversed(ops)]
    repart = next(i for i, n in enumerate(names) if "Repartition" in n)
    assert "read_decode" in names[repart - 1] and "SemanticSRStage" in names[repart + 1], names
    # Write tasks hold an SR batch of outputs: `write_memory_gb` reserves it (none unless asked).
    write = lambda job_: build_dataset(job_, plan, pools)._logical_plan.dag  # noqa: E731
    assert "memory" not in write(j).ray_remote_args
    assert write(job(tmp_path, tmp_path / "out", resources={"write_memory_gb": 6})).ray_remote_args["memory"] == 6 * 2**30


def test_manifest_parts_are_bounded_by_rows_and_by_time(tmp_path):
    """Issue 19: parts waited for 1,024 rows (35-60 min of GPU work at x4), all lost with a killed driver.
    A part is now written when full or when its oldest row waited manifest_max_age_s, whichever first."""
    import time

    import pyarrow as pa

    from pipelines.upscale.run import ManifestSink, Tally

    j = job(tmp_path, tmp_path / "out", manifest_rows_per_file=4, manifest_max_age_s=3.0)
    tally = Tally()
    sink = ManifestSink(j, "20260101T000000Z-abcdef", tally, fence=None)
    parts = tmp_path / "out" / "_manifest" / "run=20260101T000000Z-abcdef"

    def block(*ids):
        return pa.table({"image_id": list(ids), "src_uri": [f"file:///in/{i}.png" for i in ids],
                         "dst_uri": [f"file:///out/{i}.png" for i in ids]})

    sink.add(block("a", "b"))
    assert not parts.exists(), "2 of 4 rows, just now: nothing written yet"
    deadline = time.time() + 20
    while tally.rows < 2 and time.time() < deadline:  # the count is added once the part is written
        time.sleep(0.05)
    assert len(list(parts.iterdir())) == 1 and tally.rows == 2, "the timer wrote the 2 rows once they were old"
    sink.add(block("c", "d", "e", "f"))
    assert len(list(parts.iterdir())) == 2 and tally.rows == 6, "a full part is written at once"
    sink.add(block("g"))
    sink.close(flush=False)  # a run that lost its lease writes nothing more
    assert len(list(parts.iterdir())) == 2 and tally.rows == 6
    rows = pq.read_table(parts).to_pylist()
    assert sorted(r["image_id"] for r in rows) == list("abcdef") and all(r["status"] == "ok" for r in rows)


def test_a_failed_manifest_write_keeps_its_rows_and_a_lost_lease_stops_the_sink(tmp_path, monkeypatch):
    import pyarrow as pa

    import pipelines.upscale.run as run
    from cluster.lease import LeaseLost

    real, calls = run.write_part, []

    def flaky(rows, **meta):
        calls.append(len(rows))
        if len(calls) <= 2:
            raise OSError("503 SlowDown")
        return real(rows, **meta)

    monkeypatch.setattr(run, "write_part", flaky)
    tally = run.Tally()
    sink = run.ManifestSink(job(tmp_path, tmp_path / "out", manifest_rows_per_file=1, manifest_max_age_s=600),
                            "20260101T000000Z-abcdef", tally, fence=None)
    block = pa.table({"image_id": ["a"], "src_uri": ["file:///in/a.png"], "dst_uri": ["file:///out/a.png"]})
    sink.add(block)
    sink.add(block.set_column(0, "image_id", pa.array(["b"])))  # the second failure: still not final
    assert tally.rows == 0 and calls == [1, 2]
    sink.close()  # the third try writes both rows in one part; no stale error is raised
    assert tally.rows == 2 and calls == [1, 2, 2]

    def lost(rows, **meta):
        raise LeaseLost("taken")

    monkeypatch.setattr(run, "write_part", lost)
    sink = run.ManifestSink(job(tmp_path, tmp_path / "out2", manifest_rows_per_file=1), "r", run.Tally(), None)
    with pytest.raises(LeaseLost):
        sink.add(block)  # final at once: nothing more may be written
    sink.close(flush=False)
