"""Run folders for the evaluate/report tests, written with the project's own listing and manifest writers.

An upscale DST is made without the diffusion model (minutes on this CPU): each
"output" is the input upscaled x4 with bicubic plus a little noise, written
where the pipeline would put it, with manifest rows like the pipeline's.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from PIL import Image

from cluster.storage import StorageConfig
import pyarrow.parquet as pq

from pipelines.upscale.listing import commit_listing, list_inputs, listing_part_uri, new_listing_id, write_parquet_uri
from pipelines.upscale.manifest import run_dir, to_table, write_summary

RNG = np.random.default_rng(7)


def smooth_image(w: int, h: int) -> Image.Image:
    """A picture with structure at several scales (random colours, bicubic-enlarged) plus fine noise."""
    coarse = Image.fromarray((RNG.random((max(2, h // 12), max(2, w // 12), 3)) * 255).astype(np.uint8))
    img = np.asarray(coarse.resize((w, h), Image.BICUBIC)).astype(int)
    return Image.fromarray(np.clip(img + RNG.integers(-6, 7, img.shape), 0, 255).astype(np.uint8))


def write_pairs(root: Path) -> dict:
    """GT (HR) and LR folders: good pairs, a GT of odd size, an LR that is not an image, GT and LR without partners."""
    gt, lr = root / "gt", root / "lr"
    for name in ("a", "b", "sub/c", "d"):
        hr = smooth_image(96, 64)
        (gt / name).parent.mkdir(parents=True, exist_ok=True)
        (lr / name).parent.mkdir(parents=True, exist_ok=True)
        hr.save(gt / f"{name}.png")
        hr.resize((24, 16), Image.BICUBIC).save(lr / f"{name}.png")
    odd = smooth_image(98, 66)  # x4 of its LR is 96x64: the SR cannot match this GT's size
    odd.save(gt / "odd.png")
    odd.resize((24, 16), Image.BICUBIC).save(lr / "odd.png")
    smooth_image(96, 64).save(gt / "broken.png")
    (lr / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    smooth_image(96, 64).save(gt / "lonely.png")  # no input at all
    smooth_image(24, 16).save(lr / "nogt.png")  # an input without ground truth
    return {"gt": gt, "lr": lr}


def fake_upscale_run(src: Path, dst: Path, *, noise: int = 4) -> dict:
    """DST as `ugcsr upscale` leaves it: outputs, the listing, manifest parts in run=<id>/ folders (two runs), _runs/ summaries."""
    storage = StorageConfig()
    listing = list_inputs(str(src), str(dst), storage, "png")
    # The listing as a run keeps it: one shard under _state/listing/<id>/, committed by _state/listing.json.
    listing_id = new_listing_id()  # 12 hex digits: ids of another form in DST/_state are ignored
    write_parquet_uri(listing_part_uri(str(dst), listing_id, 0), listing, storage)
    commit_listing(str(dst), storage, {"src": str(src), "format": "png", "buckets": 1, "listing_id": listing_id,
                                       "images": len(listing)}, None)
    start = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.timezone.utc)
    first, second = [], []  # the rows of each run
    outputs = {}
    for k, (iid, uri, key) in enumerate(zip(*(listing[c].to_pylist() for c in ("image_id", "src_uri", "dst_key")))):
        path = Path(uri.removeprefix("file://"))
        base = dict(image_id=iid, src_uri=uri, src_bytes=path.stat().st_size, params_hash="p" * 16,
                    model_id="tiny:random", node_id="node-1", seed=k, prompt="a photo",
                    timings_ms={"decode": 2.0 + k, "semantic": 30.0 + k, "sr": 900.0 + 40 * k, "encode": 3.0})
        when = start + dt.timedelta(seconds=0.7 * k)
        try:
            lr = Image.open(path).convert("RGB")
            lr.load()
        except OSError as err:
            first.append(dict(base, status="error", stage="decode", error_type="DecodeError",
                              error_message=f"{uri}: not an image file: {err}", finished_at=when))
            continue
        w, h = lr.size
        if key == "a.png":  # failed in the first run, succeeded when the run was resumed
            first.append(dict(base, status="error", stage="sr", error_type="RuntimeError",
                              error_message="CUDA out of memory (simulated)", finished_at=when))
            when += dt.timedelta(minutes=5)
        up = np.asarray(lr.resize((4 * w, 4 * h), Image.BICUBIC)).astype(int)
        out = np.clip(up + RNG.integers(-noise, noise + 1, up.shape), 0, 255).astype(np.uint8)
        (dst / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out).save(dst / key)
        outputs[key] = dst / key
        writer = second if key == "a.png" else first
        writer.append(dict(base, status="ok", src_width=w, src_height=h, dst_uri=str(dst / key), dst_width=4 * w,
                           dst_height=4 * h, finished_at=when))
    for run, rows in (("20261129T120000Z-aaaaaa", first), ("20261129T120500Z-bbbbbb", second)):
        folder = Path(run_dir(str(dst), run))
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(to_table(rows), folder / "part-0.parquet")
    summary = {"src": str(src), "dst": str(dst), "preset": "tiny", "params_hash": "p" * 16, "images": len(listing),
               "by_status": {"ok": len(outputs), "error": 1}, "wall_s": 4.2, "images_per_s": 1.7,
               "pools": {"sr_actors": 1, "semantic_actors": 1}}
    write_summary(str(dst), "20261129T120500Z-bbbbbb", summary, storage)
    return outputs
