"""Planning at scale: plan + resume time and peak driver memory for 10^4..10^6 listed images, 50% done.

    python bench/plan_scale.py [--sizes 10000 100000 1000000]

For each size: a Parquet list of N URIs and a manifest in which half the images
already have an `ok` row (parts of 10,000 rows, as a long run leaves them).
Side by side, in fresh driver processes against one local Ray cluster:

  (a) planned as data: `ugcsr upscale LIST DST --dry-run` (listing and anti-join in Ray tasks);
  (b) on the driver, as before issue 11: the whole listing and done set in the driver, `is_in` there.

Peak driver memory is the driver process's RSS, polled every 20 ms (Ray's own
processes excluded). The growth per 10x is the ratio between successive sizes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEGACY = """
import sys, pyarrow.compute as pc
from pipelines.upscale.job import UpscaleJob
from pipelines.upscale.listing import list_inputs
from pipelines.upscale.manifest import done_ids
from srmodel import get_preset
job = UpscaleJob.model_validate({"src": sys.argv[1], "dst": sys.argv[2], "model": get_preset("tiny").model_dump(mode="json")})
listing = list_inputs(job.src, job.dst, job.storage, job.format)
done = done_ids(job.dst, job.storage, job.params_hash())
todo = listing.filter(pc.invert(pc.is_in(listing["image_id"], value_set=done)))
print(len(listing), len(todo))
"""


def make_inputs(work: Path, n: int) -> tuple[Path, Path]:
    from pipelines.upscale.job import UpscaleJob
    from pipelines.upscale.listing import _key_for_uri
    from pipelines.upscale.manifest import SCHEMA
    from pipelines.paths import output_key
    from srmodel import get_preset
    from srmodel.sampling.seeds import image_id_from_uri

    lst, dst = work / f"list-{n}.parquet", work / f"dst-{n}"
    uris = [f"s3://corpus/photos/{i // 1000:05d}/IMG_{i:08d}.jpg" for i in range(n)]
    pq.write_table(pa.table({"uri": uris}), lst, row_group_size=50_000)
    job = UpscaleJob.model_validate({"src": str(lst), "dst": str(dst), "model": get_preset("tiny").model_dump(mode="json")})
    params = job.params_hash()
    half = uris[: n // 2]
    when = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    part_dir = dst / "_manifest" / "run=20260101T000000Z-bench"
    part_dir.mkdir(parents=True)
    for start in range(0, len(half), 10_000):
        chunk = half[start : start + 10_000]
        m = len(chunk)
        cols = {name: pa.nulls(m, SCHEMA.field(name).type) for name in SCHEMA.names}
        cols.update(image_id=pa.array([image_id_from_uri(u) for u in chunk]), src_uri=pa.array(chunk),
                    status=pa.array(["ok"] * m), params_hash=pa.array([params] * m),
                    dst_uri=pa.array([f"file://{dst}/{output_key(_key_for_uri(u), 'png')}" for u in chunk]),
                    finished_at=pa.array([when] * m, SCHEMA.field("finished_at").type))
        pq.write_table(pa.table(cols, schema=SCHEMA), part_dir / f"part-{start:09d}.parquet")
    return lst, dst


def measure(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB of the driver process, its stdout)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed: {err[-2000:]}")
    return time.perf_counter() - t, peak / 2**20, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--cpus", type=int, default=4)
    args = ap.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="ugcsr-plan-"))
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": address}
    rows = []
    try:
        for n in args.sizes:
            lst, dst = make_inputs(work, n)
            new_s, new_mb, out = measure([sys.executable, "-m", "pipelines.cli", "upscale", str(lst), str(dst),
                                          "--preset", "tiny", "--dry-run", "--address", address], env)
            assert f'"to_process": {n - n // 2}' in out, out
            old_s, old_mb, out = measure([sys.executable, "-c", LEGACY, str(lst), str(dst)], env)
            assert out.split() == [str(n), str(n - n // 2)], out
            rows.append((n, new_s, new_mb, old_s, old_mb))
            print(f"  {n:>9,d} images: as data {new_s:6.1f} s {new_mb:7.0f} MiB | on the driver {old_s:6.1f} s "
                  f"{old_mb:7.0f} MiB", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"plan + resume (50% done), Parquet list, local Ray with {args.cpus} CPUs, this machine")
    print("  images     | (a) as data: s, peak driver MiB | (b) on the driver: s, peak MiB")
    for n, a_s, a_mb, b_s, b_mb in rows:
        print(f"  {n:>10,d} | {a_s:8.1f} {a_mb:10.0f}           | {b_s:8.1f} {b_mb:10.0f}")
    for (n0, a0, am0, b0, bm0), (n1, a1, am1, b1, bm1) in zip(rows, rows[1:]):
        print(f"  growth {n0:,d} -> {n1:,d} ({n1 / n0:.0f}x images): (a) time x{a1 / a0:.2f}, memory x{am1 / am0:.2f}"
              f" | (b) time x{b1 / b0:.2f}, memory x{bm1 / bm0:.2f}")


if __name__ == "__main__":
    main()
