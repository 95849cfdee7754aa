"""Planning at scale: driver and worker peak memory of plan + resume, 10^5 vs 10^6 images, 50% done, writes on.

    python bench/plan_scale.py [--sizes 100000 1000000] [--shapes list-256x400 tree flat] [--baseline DIR]

Shapes (the inputs of a real run, planned as `ugcsr upscale` plans them, listing and todo shards written):
  list-256x400  a Parquet list of N URIs planned with plan_tasks=256, plan_buckets=400 (the shape the docs
                advise for 10^8: T x B planning pieces)
  tree          a local folder of N empty .png files in 1,000 sub-folders
  flat          a local folder of N empty .png files, no sub-folders
Half of the images have an `ok` row in a manifest of 1,024-row parts (as a long run leaves them).

Each plan runs in a fresh driver process with its own local Ray (so that its workers import the
same code tree); peak RSS of the driver process
and of the largest Ray worker process are polled every 20 ms, and the driver counts the object
references it holds (every small task result lives in the driver's own object store). `--baseline DIR` plans the same inputs
with the code in DIR as well (e.g. a `git worktree` of an older commit), side by side in this run.
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

DRIVER = """
import json, sys
from cluster import ray_runtime
from pipelines.upscale.job import UpscaleJob
from pipelines.upscale.run import make_plan
from srmodel import get_preset
src, dst, cpus, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
job = UpscaleJob.model_validate({"src": src, "dst": dst, "model": get_preset("tiny").model_dump(mode="json"),
                                 "relist": True, **extra})
ray_runtime.connect(None, num_cpus=cpus)  # its own local Ray: its workers import this code tree
import threading, time, ray
peak, stop = [0], threading.Event()
def poll():  # object references this driver holds (owned or borrowed), sampled every 20 ms
    core = ray._private.worker.global_worker.core_worker
    while not stop.is_set():
        peak[0] = max(peak[0], len(core.get_all_reference_counts()))
        time.sleep(0.02)
threading.Thread(target=poll, daemon=True).start()
plan = make_plan(job)
stop.set()
print(plan.total, plan.to_process, peak[0])
"""

SHAPES = {"list-256x400": {"plan_tasks": 256, "plan_buckets": 400}, "tree": {}, "flat": {}}


def make_inputs(work: Path, shape: str, n: int) -> tuple[str, Path]:
    from pipelines.paths import output_key
    from pipelines.upscale.job import UpscaleJob
    from pipelines.upscale.listing import _key_for_uri
    from pipelines.upscale.manifest import SCHEMA
    from srmodel import get_preset
    from srmodel.sampling.seeds import image_id_from_uri

    dst = work / f"dst-{shape}-{n}"
    if shape == "list-256x400":
        src = work / f"list-{n}.parquet"
        uris = [f"s3://corpus/photos/{i // 1000:05d}/IMG_{i:08d}.jpg" for i in range(n)]
        # 512 row groups: 256 list tasks of two each (the T of the 10^8 shape)
        pq.write_table(pa.table({"uri": uris}), src, row_group_size=max(1, n // 512))
        keys = [output_key(_key_for_uri(u), "png") for u in uris]
    else:
        src = work / f"{shape}-{n}"
        rel = [f"{i % 1000:03d}/{i:08d}.png" if shape == "tree" else f"{i:08d}.png" for i in range(n)]
        for folder in {os.path.dirname(r) for r in rel}:
            (src / folder).mkdir(parents=True, exist_ok=True)
        for r in rel:
            open(src / r, "wb").close()
        uris = [f"file://{src}/{r}" for r in rel]
        keys = rel
    job = UpscaleJob.model_validate({"src": str(src), "dst": str(dst), "model": get_preset("tiny").model_dump(mode="json")})
    params, half = job.params_hash(), n // 2
    when = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    part_dir = dst / "_manifest" / "run=20260101T000000Z-bench"
    part_dir.mkdir(parents=True)
    for start in range(0, half, 1024):
        chunk, ks = uris[start : min(half, start + 1024)], keys[start : min(half, start + 1024)]
        m = len(chunk)
        cols = {name: pa.nulls(m, SCHEMA.field(name).type) for name in SCHEMA.names}
        cols.update(image_id=pa.array([image_id_from_uri(u) for u in chunk]), src_uri=pa.array(chunk),
                    status=pa.array(["ok"] * m), params_hash=pa.array([params] * m),
                    dst_uri=pa.array([f"file://{dst}/{k}" for k in ks]),
                    finished_at=pa.array([when] * m, SCHEMA.field("finished_at").type))
        pq.write_table(pa.table(cols, schema=SCHEMA), part_dir / f"part-{start:09d}.parquet")
    return str(src), dst


def _workers() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if (p.info["name"] or "").startswith("ray::") or "default_worker.py" in cmd:
            out.append(p)
    return out


def measure(cmd: list[str], env: dict, cwd: str) -> tuple[float, float, float, str]:
    """(wall s, peak RSS MiB of the driver process, peak RSS MiB of the largest Ray worker, stdout)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, cwd=cwd)
    ps, peak, worker_peak, workers, polled = psutil.Process(proc.pid), 0, 0, [], 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if time.perf_counter() - polled > 1.0:  # new workers start now and then; their RSS is polled often
            workers, polled = _workers(), time.perf_counter()
        for w in workers:
            try:
                worker_peak = max(worker_peak, w.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed: {err[-3000:]}")
    return time.perf_counter() - t, peak / 2**20, worker_peak / 2**20, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--cpus", type=int, default=4)
    ap.add_argument("--baseline", help="a checkout of other code to plan the same inputs with, side by side")
    args = ap.parse_args()

    import json

    work = Path(tempfile.mkdtemp(prefix="ugcsr-plan-"))
    trees = {"this": str(ROOT), **({"baseline": str(Path(args.baseline).resolve())} if args.baseline else {})}
    rows = []
    try:
        for shape in args.shapes:
            for n in args.sizes:
                src, dst = make_inputs(work, shape, n)
                for name, tree in trees.items():
                    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": tree}
                    shutil.rmtree(dst / "_state", ignore_errors=True)
                    wall, drv, wrk, out = measure([sys.executable, "-c", DRIVER, src, str(dst), str(args.cpus),
                                                   json.dumps(SHAPES[shape])], env, cwd=tree)
                    total, todo, refs = out.split()
                    assert (total, todo) == (str(n), str(n - n // 2)), out
                    rows.append((shape, n, name, wall, drv, wrk, int(refs)))
                    print(f"  {shape:13s} {n:>9,d} {name:8s}: {wall:6.1f} s, driver {drv:6.0f} MiB, "
                          f"largest worker {wrk:6.0f} MiB, object refs on the driver {refs}", flush=True)
                shutil.rmtree(src, ignore_errors=True) if os.path.isdir(src) else os.remove(src)
                shutil.rmtree(dst, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nplan + resume (50% done, writes on), a local Ray with {args.cpus} CPUs per plan, this machine")
    print("  shape         code     |     images |  wall s | driver MiB | largest worker MiB | driver's object refs")
    for shape, n, name, wall, drv, wrk, refs in rows:
        print(f"  {shape:13s} {name:8s} | {n:>10,d} | {wall:7.1f} | {drv:10.0f} | {wrk:18.0f} | {refs:>10,d}")
    for shape in args.shapes:
        for name in trees:
            mine = [r for r in rows if r[0] == shape and r[2] == name]
            for a, b in zip(mine, mine[1:]):
                print(f"  growth {shape} {name}, {a[1]:,d} -> {b[1]:,d} ({b[1] / a[1]:.0f}x images): driver "
                      f"x{b[4] / a[4]:.2f}, largest worker x{b[5] / a[5]:.2f}, time x{b[3] / a[3]:.2f}")


if __name__ == "__main__":
    main()
