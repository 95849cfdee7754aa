"""Write stage: encode SR images and store them under DST; the batch leaves as manifest rows."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cluster.storage import StorageConfig, error_code, is_remote, join, write_bytes_atomic

from .batch import StageTimer, ensure_status_columns, fail, ok_rows, size

FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
HEAVY = ("image", "sr_image", "tokens", "bytes")


def encode_image(rgb: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, FORMATS[fmt], **({} if fmt == "png" else {"quality": quality}))
    return buf.getvalue()


def as_uri(location: str) -> str:
    return location if is_remote(location) else "file://" + location


class WriteStage:
    """batch: `sr_image`, `dst_key` -> adds `dst_uri`, `dst_width`, `dst_height`, `status`; drops pixels."""

    def __init__(self, dst: str, fmt: str = "png", quality: int = 95, storage: dict | StorageConfig | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.dst, self.fmt, self.quality = dst, fmt, quality
        self.storage = StorageConfig.model_validate(storage or {})

    def __call__(self, batch: dict) -> dict:
        batch = ensure_status_columns(batch)
        n = size(batch)
        uris, widths, heights = [""] * n, [0] * n, [0] * n
        with StageTimer(batch, "encode") as timer:
            for i in ok_rows(batch):
                img = np.asarray(batch["sr_image"][i], dtype=np.uint8)
                uri = f"{self.dst}/{batch['dst_key'][i]}"  # for the message only; join checks the key
                try:
                    uri = join(self.dst, str(batch["dst_key"][i]))  # a key from a tampered todo shard fails here
                    with timer.rows([i]):
                        write_bytes_atomic(uri, encode_image(img, self.fmt, self.quality), self.storage)
                except Exception as err:  # noqa: BLE001 - this image's record, not the job's end
                    fail(batch, i, "write", f"cannot write {uri}: {err}", error_code(err))
                    continue
                uris[i], heights[i], widths[i] = as_uri(uri), img.shape[0], img.shape[1]
        for col in HEAVY:
            batch.pop(col, None)
        batch.update(
            dst_uri=uris,
            dst_width=np.array(widths, np.int32),
            dst_height=np.array(heights, np.int32),
            status=["error" if e else "ok" for e in batch["error_type"]],
        )
        return batch
