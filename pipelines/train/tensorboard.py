"""TensorBoard event files for a training run: RUN/tensorboard/, one file per checkpoint.

Written with tensorboardX (it comes with ray[train]) into a local folder, then copied to RUN (a folder or an
object store prefix) under a name sorted by step, so TensorBoard reads the files in order. A file holds the
steps since the previous checkpoint: a resumed run continues after its checkpoint and never logs a step twice.

    tensorboard --logdir RUN/tensorboard        (s3:// works where TensorBoard's S3 support is installed)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from cluster.storage import StorageConfig, join, write_bytes_atomic

SCALARS = ("loss", "lr", "grad_norm", "samples_per_s", "val_loss")


def event_file_name(step: int) -> str:
    return f"events.out.tfevents.{step:010d}.ugcsr"


def write_events(run: str, rows: list[dict], step: int, storage: StorageConfig,
                 images: dict[str, np.ndarray] | None = None) -> str | None:
    """The metric rows (METRICS_SCHEMA) and validation images (tag -> HxWx3 uint8) of the steps up to `step`
    as RUN/tensorboard/<event file>; returns its URI (None when there is nothing to log)."""
    from tensorboardX import SummaryWriter

    if not rows and not images:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(logdir=tmp, flush_secs=3600)
        for r in rows:
            for name in SCALARS:
                if r.get(name) is not None:
                    writer.add_scalar(f"train/{name}", float(r[name]), global_step=int(r["step"]),
                                      walltime=float(r["time"]) if r.get("time") else None)
        for tag, image in (images or {}).items():
            writer.add_image(f"validation/{tag}", image, global_step=step, dataformats="HWC")
        writer.close()
        (written,) = Path(tmp).glob("events.out.tfevents.*")
        uri = join(run, "tensorboard", event_file_name(step))
        write_bytes_atomic(uri, written.read_bytes(), storage)
    return uri
