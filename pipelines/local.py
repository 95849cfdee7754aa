"""The upscale job as a plain in-process loop over local folders (no Ray).

Runs the same actor classes the Ray pipeline schedules, in order, on small
batches: read -> decode -> semantic -> SR -> encode -> write + manifest rows.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from actors.decode import DecodeStage
from actors.encode import EncodeStage
from actors.semantic import SemanticStage
from actors.sr import SRStage
from srmodel.config import ModelConfig
from srmodel.seeds import image_id_from_uri

from .manifest import now, to_table
from .paths import list_images, output_key


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def run_local(
    src: str | Path,
    dst: str | Path,
    config: ModelConfig,
    *,
    fmt: str = "png",
    batch_size: int = 4,
    limit: int | None = None,
    device: str | None = None,
    progress=None,
) -> dict:
    src, dst = Path(src), Path(dst)
    files = list_images(src)[:limit]
    started = time.perf_counter()
    decode, encode = DecodeStage(), EncodeStage(fmt)
    semantic = SemanticStage(config, device)
    sr = SRStage(config, device)
    model_id = config.source.revision if config.source else config.name
    params_hash = config.params_hash()
    node = socket.gethostname()
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        uris = [p.resolve().as_uri() for p in chunk]
        batch = {"src_uri": uris, "image_id": [image_id_from_uri(u) for u in uris], "bytes": [p.read_bytes() for p in chunk]}
        timings = {}
        for name, stage in (("decode", decode), ("semantic", semantic), ("sr", sr), ("encode", encode)):
            t0 = time.perf_counter()
            batch = stage(batch)
            timings[name] = (time.perf_counter() - t0) * 1000 / len(chunk)
        for i, path in enumerate(chunk):
            row = dict(
                image_id=batch["image_id"][i], src_uri=uris[i], src_bytes=len(batch["bytes"][i]),
                src_width=batch["src_width"][i], src_height=batch["src_height"][i],
                prompt=batch["prompt"][i], seed=batch["seed"][i], params_hash=params_hash, model_id=model_id,
                timings_ms=timings, node_id=node, finished_at=now(),
            )
            if batch["error_type"][i]:
                row.update(status="error", stage="decode", error_type=batch["error_type"][i],
                           error_message=f"{path}: {batch['error_message'][i]}")
            else:
                key = output_key(str(path.relative_to(src)), fmt)
                _atomic_write(dst / key, batch["out_bytes"][i])
                row.update(status="ok", dst_uri=(dst / key).resolve().as_uri(),
                           dst_width=batch["dst_width"][i], dst_height=batch["dst_height"][i])
            rows.append(row)
        if progress:
            progress(len(chunk))
    wall = time.perf_counter() - started
    summary = {
        "images": len(rows),
        "by_status": dict(Counter(r["status"] for r in rows)),
        "by_error_type": dict(Counter(r["error_type"] for r in rows if r.get("error_type"))),
        "wall_s": round(wall, 3),
        "images_per_s": round(len(rows) / wall, 4) if wall else None,
        "params_hash": params_hash,
        "preset": config.name,
    }
    manifest = dst / "_manifest"
    manifest.mkdir(parents=True, exist_ok=True)
    if rows:
        pq.write_table(to_table(rows), manifest / "part-local-00000.parquet")
    (manifest / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
