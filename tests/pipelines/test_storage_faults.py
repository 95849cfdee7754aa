"""Storage faults: a run through a proxy that answers 503, drops connections, cuts bodies and delays."""

import io
import time

import pytest
from PIL import Image

from tests.support.inputs import rng_image
from pipelines.upscale.job import UpscaleJob
from pipelines.upscale.manifest import read_manifest
from pipelines.upscale.run import run_upscale
from tests.support.s3proxy import FaultyProxy
from srmodel import get_preset

pytestmark = pytest.mark.slow  # a faulty S3 proxy in front of a local S3 server


def test_run_through_a_faulty_store_accounts_for_every_image_once(ray_local, s3, s3_endpoint):
    s3.create_bucket(Bucket="src")
    s3.create_bucket(Bucket="dst")
    n = 16
    sizes = {}
    for k in range(n):
        w, h = 10 + (k % 4) * 2, 8 + (k % 3) * 2
        buf = io.BytesIO()
        rng_image(w, h, k).save(buf, "PNG")
        s3.put_object(Bucket="src", Key=f"in/{k % 3}/IMG_{5000 + k}.png", Body=buf.getvalue())
        sizes[f"IMG_{5000 + k}"] = (w, h)
    model = get_preset("tiny").model_dump(mode="json")
    model["sampler"].update(steps=1)
    with FaultyProxy(s3_endpoint, every=5) as proxy:
        job = UpscaleJob.model_validate({
            "src": "s3://src/in", "dst": "s3://dst/out", "model": model, "manifest_rows_per_file": 6,
            "storage": {"endpoint_url": proxy.url, "max_attempts": 8, "body_retries": 4},
            "resources": {"sr_batch": 4, "semantic_batch": 4, "io_batch": 4},
        })
        t = time.perf_counter()
        summary = run_upscale(job)
        wall = time.perf_counter() - t
        proxy.enabled = False  # read back what was stored, without faults
        table = read_manifest("s3://dst/out", job.storage.model_copy(update={"endpoint_url": s3_endpoint}))
    faults = {f"{f}/{k}": c for (f, k), c in proxy.counts.items() if f != "requests"}
    print(f"faulty store: {dict(proxy.counts)}; run {wall:.1f} s; summary {summary['by_status']}")
    # Faults hit reads, writes and listings alike.
    for kind in ("read", "write", "list"):
        assert sum(c for key, c in faults.items() if key.endswith("/" + kind)), (kind, faults)
    assert {"503/read", "drop/read", "cut/read", "delay/read", "503/write", "drop/write"} <= set(faults), faults
    rows = table.to_pylist()
    assert len(rows) == n and len({r["image_id"] for r in rows}) == n, "every image accounted for exactly once"
    assert summary["unaccounted"] == 0 and summary["by_status"] == {"ok": n}, summary
    for r in rows:  # no corrupt output: every object decodes at exactly 4x its source
        key = r["dst_uri"].removeprefix("s3://dst/")
        img = Image.open(io.BytesIO(s3.get_object(Bucket="dst", Key=key)["Body"].read()))
        img.load()
        w, h = sizes[key.rsplit("/", 1)[1].split(".")[0]]
        assert img.size == (4 * w, 4 * h) == (r["dst_width"], r["dst_height"])
