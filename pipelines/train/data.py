"""The training data stage: TRAINSET's shards, the held-out split and its validation rows, the Ray Data stream.

The stream is read_parquet over the shards in stream order (`stream_order`) -> CPU decode/tokenise actors
(actors/train_data.py's TrainDecode); Ray Train splits it over the workers, each shuffling in a local buffer.
A resumed epoch (`rest_of_epoch`) reads on from where its checkpoint left off: the shards already trained on are
not read again, and the rows trained on of the shard it stopped in are dropped before decoding.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from cluster.storage import StorageConfig, filesystem, is_remote

from .job import TrainJob


def list_shards(trainset: str, storage: StorageConfig) -> list[str]:
    """The shard files only (never _manifest/), sorted: the unshuffled order is the build order."""
    fs, root = filesystem(trainset, storage)
    if not fs.isdir(root):
        raise FileNotFoundError(f"TRAINSET {trainset} is not a folder/prefix (expected build-trainset's output)")
    paths = sorted(fs.glob(root.rstrip("/") + "/shard-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"TRAINSET {trainset} holds no shard-*.parquet; build it with `ugcsr build-trainset`")
    return paths


def arrow_filesystem(uri: str, storage: StorageConfig):
    """(pyarrow filesystem or None, path) for Ray: object stores go through our fsspec config (endpoint, retries)."""
    if not is_remote(uri):
        return None, uri
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri, storage)
    return PyFileSystem(FSSpecHandler(fs)), path


def row_counts(paths: list[str], storage: StorageConfig, trainset: str) -> list[int]:
    fs, _ = filesystem(trainset, storage)
    counts = []
    for p in paths:
        with fs.open(p, "rb") as f:
            counts.append(pq.ParquetFile(f).metadata.num_rows)
    return counts


def held_out(job: TrainJob, shards: list[str]) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards): the last `holdout_shards` (default none: rows are held out instead)."""
    hold = job.holdout_shards or 0
    if hold >= len(shards):
        raise ValueError(f"holdout_shards={hold} leaves no training shard (TRAINSET has {len(shards)})")
    return shards[: len(shards) - hold], shards[len(shards) - hold:]


def validation_rows(job: TrainJob, held: list[str], train: list[str]) -> list[dict]:
    """The first job.val_images rows of the held-out shards, else of the last training shard (undecoded: PNG
    bytes and prompt). Rows taken from a training shard are kept out of training (`dataset(exclude=...)`)."""
    fs, _ = filesystem(job.trainset, job.storage)
    rows = []
    for p in held or train[-1:]:
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            for i in range(pf.num_row_groups):  # a row group at a time: a shard can be GBs of PNGs
                rows += pf.read_row_group(i, columns=["unit_id", "lr_png", "gt_png", "prompt"]).to_pylist()
                if len(rows) >= job.val_images:
                    return rows[: job.val_images]
    return rows[: job.val_images]


def stream_order(job: TrainJob, paths: list[str], rows: list[int]) -> tuple[list[str], list[int]]:
    """The shards (and their row counts) in the order every epoch reads them: build order, or a permutation seeded by
    the recipe's seed (shuffle). The same each epoch: Ray Train runs one dataset per epoch again; each worker's local
    shuffle buffer is seeded per epoch. Shards are hash buckets (a uniform sample of the corpus each), so shard
    order plus the local buffer mixes as well as Ray's block order did, and a resume can name what it has read."""
    if not job.shuffle:
        return list(paths), list(rows)
    order = np.random.default_rng(job.recipe.seed).permutation(len(paths))
    return [paths[i] for i in order], [rows[i] for i in order]


def rest_of_epoch(job: TrainJob, paths: list[str], rows: list[int], exclude: list[str],
                  done: int) -> tuple[list[str], list[str]]:
    """(shards left, unit_ids to drop) once `done` rows of an epoch (stream order; `rows` counts each shard's rows
    without `exclude`) were trained on: the shards before the cut are not read at all, and the first rows of the
    shard it falls in are dropped before decoding. Exact when the order is deterministic (one worker, no shuffle);
    with shuffle or several workers the workers consumed roughly, not exactly, the first `done` rows (shards read at
    once interleave), so rows of the shards being read at the checkpoint are seen twice or not this epoch."""
    for i, n in enumerate(rows):
        if done < n:
            break
        done -= n
    else:
        return [], []
    if not done:
        return paths[i:], []
    fs, _ = filesystem(job.trainset, job.storage)
    with fs.open(paths[i], "rb") as f:  # one small column of one shard
        ids = pq.read_table(f, columns=["unit_id"]).column("unit_id").to_pylist()
    skip = set(exclude)
    return paths[i:], [u for u in ids if u not in skip][:done]


def drop_units(batch, ids: list[str]):
    """(map_batches, pyarrow) the rows whose unit_id is not in `ids`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return batch.filter(pc.invert(pc.is_in(batch["unit_id"], value_set=pa.array(ids, pa.string()))))


def dataset(job: TrainJob, paths: list[str], tokenizer_folder: str, exclude: list[str] = ()):
    """The training stream over `paths` in their order (`stream_order`); rows whose unit_id is in `exclude`
    (held-out validation rows, rows a resumed epoch has trained on) are dropped before decoding."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from actors.train_data import TrainDecode

    fs, _ = arrow_filesystem(job.trainset, job.storage)
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["unit_id", "gt_png", "lr_png", "prompt"])
    if exclude:
        ds = ds.map_batches(drop_units, fn_kwargs={"ids": list(exclude)}, batch_format="pyarrow", batch_size=None)
    return ds.map_batches(TrainDecode, fn_constructor_kwargs={"tokenizer_folder": tokenizer_folder,
                                                             "storage": job.storage.model_dump(mode="json")},
                          batch_size=job.decode_batch, num_cpus=job.decode_cpus,
                          # grows with the training workers (an autoscaling cluster adds CPUs with the GPU nodes)
                          compute=ActorPoolStrategy(min_size=job.decode_actors,
                                                    max_size=max(job.decode_actors, 2 * job.workers)))
