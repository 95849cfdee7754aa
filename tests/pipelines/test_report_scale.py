"""Issue 19: `report` and `evaluate` read the manifest bucket by bucket of images, never as one table.

The bounded path must give what the whole-table computation gave (counts, error groups, each image's latest
row, evaluate's outputs and failures) whatever the number of buckets, and never hand more than one bucket's
rows to `latest_table`.
"""

import datetime as dt
import json
import random
import zlib
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.storage import StorageConfig
from pipelines.report import data as report_data
from pipelines.report.data import MANIFEST_COLUMNS, load_upscale_run
from pipelines.upscale import outputs
from pipelines.upscale.manifest import SCHEMA
from pipelines.upscale.outputs import latest_rows, latest_table, read_run_manifest

BASE = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def random_manifest(dst, seed: int, parts: int = 9, rows_per_part: int = 40) -> int:
    """DST/_manifest as runs leave it: run=<id>/ folders, an older flat part and a part of an older schema;
    image_ids repeated across parts and runs, equal finished_at (ties) and nulls everywhere a row may have them."""
    rng = random.Random(seed)
    ids = [f"{rng.getrandbits(64):016x}" for _ in range(120)]
    n = 0
    for p in range(parts):
        rows = []
        for _ in range(rng.randint(rows_per_part // 2, rows_per_part)):
            status = rng.choice(["ok", "ok", "error", "skipped", None])
            image_id = rng.choice(ids) if rng.random() > 0.02 else None
            rows.append(dict(
                image_id=image_id, src_uri=rng.choice([f"file:///src/{image_id}.png", None]), status=status,
                stage=rng.choice(["decode", "sr", "", None]), error_type=rng.choice(["DecodeError", "OOM", "", None]),
                error_message=rng.choice(["bad file", "out of memory", "", None, f"no {image_id}"]),
                dst_uri=rng.choice([f"{dst}/{image_id}.png", f"file://{dst}/{image_id}.png", "", None]),
                params_hash=rng.choice(["p1", "p2", None]), model_id="tiny", node_id=rng.choice(["n1", "n2"]),
                timings_ms=rng.choice([None, {"decode": rng.choice([0.0, 2.5]), "semantic": None,
                                             "sr": rng.uniform(100, 900), "encode": 3.0}]),
                finished_at=rng.choice([None, BASE, BASE + dt.timedelta(seconds=rng.randint(0, 4))])))
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        if p == 0:  # the flat layout of older versions: the run in the part's name
            path = dst / "_manifest" / "part-20260101T000000Z-0.parquet"
        else:
            path = dst / "_manifest" / f"run=r{p % 3}" / f"part-{p:04d}.parquet"
        if p == 1:  # a part written before timings and nodes were recorded
            table = table.drop_columns(["timings_ms", "node_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        n += len(table)
    return n


def write_evaluation(dst, latest: pa.Table) -> None:
    """An `evaluate` output beside the run: PSNRs for some ok outputs, with ties."""
    rows = [{"image": f"{i}.png", "sr_uri": r["dst_uri"], "psnr": float(i % 4), "gt_uri": None}
            for i, r in enumerate(latest.to_pylist()) if r["status"] == "ok" and r["dst_uri"]]
    (dst / "_eval").mkdir()
    (dst / "_eval" / "summary.json").write_text(json.dumps({"means": {}, "gt": str(dst)}))
    pq.write_table(pa.Table.from_pylist(rows[::2]), dst / "_eval" / "metrics.parquet")


def bucket_rows_for(rows: int, buckets: int) -> int:
    return -(-2 * rows // buckets)  # latest_buckets makes ceil(2 * rows / bucket_rows) buckets


# ---------------------------------------------------------------- the whole-table computation, row by row

def reference_counts(whole: pa.Table, latest: pa.Table) -> list[list]:
    now, every = Counter(latest["status"].to_pylist()), Counter(whole["status"].to_pylist())
    statuses = sorted(set(now) | set(every), key=str)
    return [[s, now.get(s, 0), every.get(s, 0)] for s in statuses] + [["total", len(latest), len(whole)]]


def reference_errors(latest: pa.Table) -> list[tuple]:
    """Groups of equal size in order of their first image (the rule the whole-table code's comment gave; its
    multi-key pyarrow group_by did not always keep it, buckets cannot reproduce that order)."""
    groups = {}
    for r in latest.to_pylist():
        if r["status"] == "error":
            groups.setdefault((r["stage"] or "?", r["error_type"] or "?"), []).append(r)
    out = [(stage, etype, len(rows), list(dict.fromkeys(r["error_message"] or "" for r in rows))[:3],
            [r["src_uri"] or "" for r in rows][:5]) for (stage, etype), rows in groups.items()]
    return sorted(out, key=lambda g: -g[2])


def reference_throughput(whole: pa.Table) -> dict[str, list[float]]:
    """run -> seconds since its first row, ascending; runs in order of their first row in time."""
    timed = sorted((r["finished_at"], k, r["run"] or "run") for k, r in enumerate(whole.to_pylist()) if r["finished_at"])
    out = {}
    for at, _, run in timed:
        out.setdefault(run, []).append(at)
    return {run: [(t - ts[0]).total_seconds() for t in ts] for run, ts in out.items()}


def reference_stage_ms(whole: pa.Table) -> dict[str, list[float]]:
    out = {}
    for r in whole.to_pylist():
        for stage, ms in (r["timings_ms"] or {}).items():
            if ms:
                out.setdefault(stage, []).append(ms)
    return {s: sorted(out[s]) for s in ("decode", "semantic", "sr", "encode") if s in out}


def reference_worst(latest: pa.Table, dst, k: int) -> list[dict]:
    psnr = {r["sr_uri"].removeprefix("file://"): r["psnr"]
            for r in pq.read_table(dst / "_eval" / "metrics.parquet").to_pylist()}
    ok = [r for r in latest.to_pylist() if r["status"] == "ok" and r["dst_uri"]]
    return sorted((r for r in ok if r["dst_uri"].removeprefix("file://") in psnr),
                  key=lambda r: psnr[r["dst_uri"].removeprefix("file://")])[:k]


def reference_sr_candidates(whole: pa.Table, dst) -> tuple[dict, dict]:
    outputs_, failed = {}, {}
    for row in latest_rows(whole):
        if not row["dst_uri"]:
            continue  # no listing here: a row without an output path cannot be placed
        key = row["dst_uri"].removeprefix("file://")[len(str(dst)) + 1:]
        if row["status"] == "ok":
            outputs_[key] = row["dst_uri"] if "://" in row["dst_uri"] else "file://" + row["dst_uri"]
        elif row["status"] == "error":
            failed[key] = row
    return outputs_, failed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_bounded_path_gives_the_whole_tables_counts_errors_and_latest_rows(tmp_path, seed, monkeypatch):
    from pipelines.upscale.outputs import open_run_manifest

    dst = tmp_path / "out"
    n = random_manifest(dst, seed)
    whole = read_run_manifest(str(dst), columns=MANIFEST_COLUMNS)
    latest = latest_table(whole)
    write_evaluation(dst, latest)
    first_row = {}
    for k, image_id in enumerate(whole["image_id"].to_pylist()):
        first_row.setdefault(image_id, k)

    picks = set()
    for buckets in (1, 3, 7):
        limit = bucket_rows_for(n, buckets)
        found = list(open_run_manifest(str(dst), columns=MANIFEST_COLUMNS).latest_buckets(bucket_rows=limit))
        assert len(found) == buckets
        merged = pa.concat_tables(found).sort_by("_row")
        assert merged["_row"].to_pylist() == [first_row[i] for i in merged["image_id"].to_pylist()]
        assert merged.drop_columns(["_row"]).to_pylist() == latest.to_pylist()

        run = load_upscale_run(str(dst), StorageConfig(), eval_dir=None, gallery=9, per_page=3, bucket_rows=limit)
        assert run.counts == reference_counts(whole, latest)
        assert [(g.stage, g.error_type, g.images, g.messages, g.inputs) for g in run.errors] == reference_errors(latest)
        # fewer rows than a sample holds: every finish time and stage time, as the whole-table code gave them
        assert {k: v.tolist() for k, v in run.throughput.items()} == reference_throughput(whole)
        assert run.finished == {k: len(v) for k, v in reference_throughput(whole).items()}
        assert {k: sorted(v.tolist()) for k, v in run.stage_ms.items()} == reference_stage_ms(whole)
        assert [g.row for g in run.gallery[0].items] == reference_worst(latest, dst, 3)
        picks.add(tuple((g.gid, tuple(i.row["image_id"] for i in g.items)) for g in run.gallery))

        # evaluate's view of the same manifest: its outputs and failures, in the same order
        monkeypatch.setattr(outputs, "BUCKET_ROWS", limit)
        from pipelines.evaluate import EvalJob, sr_candidates

        got_outputs, got_failed, kind = sr_candidates(EvalJob(sr=str(dst), gt=str(tmp_path)))
        want_outputs, want_failed = reference_sr_candidates(whole, dst)
        assert kind == "upscale run" and list(got_outputs.items()) == list(want_outputs.items())
        assert list(got_failed) == list(want_failed)
        assert all(got_failed[k]["image_id"] == want_failed[k]["image_id"] for k in want_failed)

    assert len(picks) == 1, "the gallery's picks do not depend on the bucketing"
    (worst, worst_ids), (sample, sample_ids) = next(iter(picks))
    assert worst == "worst" and sample == "sample"
    ok = [r for r in latest.to_pylist() if r["status"] == "ok" and r["dst_uri"]]
    want = sorted(ok, key=lambda r: (zlib.crc32((r["image_id"] or "").encode()), r["image_id"] or ""))[:9]
    by_id = sorted((r["image_id"] for r in want), key=lambda i: (i is None, i or ""))
    assert len(ok) > 9 and list(sample_ids) == by_id  # the 9 lowest CRCs, by image_id


def test_no_more_than_one_buckets_rows_reach_latest_table(tmp_path, monkeypatch):
    """The memory bound's mechanism: with a small bucket limit, report and evaluate hand latest_table at most
    that many rows at a time (the whole-table code handed it every row at once)."""
    dst = tmp_path / "out"
    n = random_manifest(dst, 3, parts=6, rows_per_part=1024)  # 1,024-row parts, as the pipeline writes them
    limit = 800
    seen = []

    def spy(table, *args, **kwargs):
        seen.append(len(table))
        return latest_table(table, *args, **kwargs)

    monkeypatch.setattr(outputs, "BUCKET_ROWS", limit, raising=False)
    monkeypatch.setattr(outputs, "latest_table", spy)
    monkeypatch.setattr(report_data, "latest_table", spy, raising=False)  # where the whole-table code called it
    load_upscale_run(str(dst), StorageConfig(), eval_dir=None, gallery=2, per_page=2)
    assert max(seen) <= limit, f"{max(seen)} rows at once in latest_table, more than one bucket's {limit}"
    assert sum(seen) == n and len(seen) >= 2 * n // limit

    from pipelines.evaluate import EvalJob, sr_candidates

    seen.clear()
    sr_candidates(EvalJob(sr=str(dst), gt=str(tmp_path)))
    assert sum(seen) == n and max(seen) <= limit
