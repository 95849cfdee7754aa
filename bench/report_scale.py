"""`ugcsr report`'s data loading at scale: peak memory and wall time, 10^5 vs 10^6 manifest rows.

    python bench/report_scale.py [--sizes 100000 1000000] [--bucket-rows 100000] [--whole]

Each size is a synthetic DST in the pipeline's layout: `_manifest/run=<id>/part-<hash>.parquet` parts of
1,024 rows in today's schema (manifest.py), two runs (the second retried the first one's 5% failures), a few
error types, realistic URIs, prompts and timings. `load_upscale_run` (everything the page shows, no drawing)
runs on each in a fresh Python process, which reports its own peak RSS (ru_maxrss) and wall time; the
memory bound holds when the two peaks are close (target: within x1.2).

`--bucket-rows` is the bucket limit both sizes run with: small enough that both are several buckets, as a
10^8-row manifest is with the default (BUCKET_ROWS, 2 M): below the default a manifest is one bucket, and its
memory grows with it up to that. `--whole` also times the whole-table way (read_run_manifest + latest_table,
what report did before) for contrast.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, resource, sys, time
mode, dst, bucket_rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
from cluster.storage import StorageConfig
from pipelines.report.data import MANIFEST_COLUMNS, load_upscale_run
from pipelines.upscale.outputs import latest_table, read_run_manifest
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if mode == "bounded":
    run = load_upscale_run(dst, StorageConfig(), eval_dir=None, gallery=24, per_page=8, bucket_rows=bucket_rows)
    images, rows = run.counts[-1][1], run.counts[-1][2]
else:
    whole = read_run_manifest(dst, columns=MANIFEST_COLUMNS)
    images, rows = len(latest_table(whole)), len(whole)
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"wall": wall, "peak_mib": peak / 1024, "imports_mib": base / 1024, "images": images, "rows": rows}))
"""

RUNS = ("20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb")
ERRORS = [("decode", "DecodeError", "cannot identify image file"), ("sr", "OutOfMemoryError", "CUDA out of memory"),
          ("read", "FileNotFoundError", "no such key")]


def part_rows(ids: np.ndarray, run: int, rng: np.random.Generator, fail: float) -> pa.Table:
    """One manifest part of these images (indices), as `rows_from_batch` would write it."""
    from pipelines.upscale.manifest import SCHEMA

    m = len(ids)
    iid = [hashlib.sha256(f"img{i}".encode()).hexdigest()[:32] for i in ids]
    src = [f"s3://corpus/photos/{i // 1000:05d}/IMG_{i:08d}.jpg" for i in ids]
    err = rng.random(m) < fail
    kind = rng.integers(0, len(ERRORS), m)
    t0 = dt.datetime(2026, 1, 1 + run, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=int(ids[0]) // 50)
    ms = rng.lognormal([3, 4, 7, 3], 0.4, (m, 4))
    cols = {name: pa.nulls(m, SCHEMA.field(name).type) for name in SCHEMA.names}
    cols.update(
        image_id=pa.array(iid), src_uri=pa.array(src), src_bytes=pa.array(rng.integers(10**4, 10**6, m)),
        status=pa.array(np.where(err, "error", "ok")),
        stage=pa.array([ERRORS[k][0] if e else None for k, e in zip(kind, err)], pa.string()),
        error_type=pa.array([ERRORS[k][1] if e else None for k, e in zip(kind, err)], pa.string()),
        error_message=pa.array([f"{s}: {ERRORS[k][2]}" if e else None for k, e, s in zip(kind, err, src)], pa.string()),
        dst_uri=pa.array([None if e else f"s3://out/run/{i:08d}.png" for i, e in zip(ids, err)], pa.string()),
        prompt=pa.array(["dog, grass, tree, sky, outdoor, ,clean, high-resolution, 8k"] * m),
        tags=pa.array(["dog, grass, tree, sky, outdoor"] * m), params_hash=pa.array(["f3a9c2d1e0b4a5c6"] * m),
        model_id=pa.array(["seesr-ugc:checkpoint-90000"] * m), node_id=pa.array([f"node-{ids[0] % 8}"] * m),
        timings_ms=pa.StructArray.from_arrays([pa.array(ms[:, k]) for k in range(4)], fields=list(SCHEMA.field("timings_ms").type)),
        finished_at=pa.array([t0] * m, SCHEMA.field("finished_at").type))
    return pa.table(cols, schema=SCHEMA)


def make_dst(work: Path, n: int) -> Path:
    """n rows: run 1 covers the images, run 2 retries those that failed, with fresh images to make up n."""
    from pipelines.upscale.manifest import part_name

    dst, rng = work / f"dst-{n}", np.random.default_rng(n)
    first = int(n / 1.05)
    retried = np.flatnonzero(rng.random(first) < 0.05)[: n - first]
    plan = [(0, np.arange(first)), (1, np.r_[retried, np.arange(first, first + n - first - len(retried))])]
    for run, ids in plan:
        folder = dst / "_manifest" / f"run={RUNS[run]}"
        folder.mkdir(parents=True)
        for start in range(0, len(ids), 1024):
            chunk = ids[start:start + 1024]
            table = part_rows(chunk, run, rng, 0.05 if run == 0 else 0.01)
            pq.write_table(table, folder / part_name(table["image_id"].to_pylist()))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--bucket-rows", type=int, default=100_000)
    ap.add_argument("--whole", action="store_true", help="also the whole-table way, for contrast")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ugcsr-report-"))
    modes = ["bounded"] + (["whole"] if args.whole else [])
    results = {}
    try:
        for n in args.sizes:
            dst = make_dst(work, n)
            for mode in modes:
                out = subprocess.run([sys.executable, "-c", CHILD, mode, str(dst), str(args.bucket_rows)], cwd=ROOT,
                                     capture_output=True, text=True, check=True)
                results[mode, n] = r = json.loads(out.stdout.splitlines()[-1])
                assert r["rows"] == n, r
                print(f"  {mode:7s} {n:>10,d} rows: {r['wall']:6.1f} s, peak RSS {r['peak_mib']:6.0f} MiB "
                      f"({r['imports_mib']:.0f} after imports), {r['images']:,d} images", flush=True)
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nreport data loading (load_upscale_run), bucket limit {args.bucket_rows:,d} rows, 1,024-row parts")
    print("  way      |   manifest rows |  images   | wall s | peak RSS MiB")
    for (mode, n), r in results.items():
        print(f"  {mode:8s} | {n:>15,d} | {r['images']:>9,d} | {r['wall']:6.1f} | {r['peak_mib']:12.0f}")
    for mode in modes:
        sizes = [n for m, n in results if m == mode]
        for a, b in zip(sizes, sizes[1:]):
            ra, rb = results[mode, a], results[mode, b]
            print(f"  {mode}: {a:,d} -> {b:,d} rows (x{b / a:.0f}): peak RSS x{rb['peak_mib'] / ra['peak_mib']:.2f}, "
                  f"wall x{rb['wall'] / ra['wall']:.2f}")


if __name__ == "__main__":
    main()
