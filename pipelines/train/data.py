"""The training data stage: TRAINSET's shards, the held-out split and its validation rows, the Ray Data stream.

The stream is read_parquet -> CPU decode/tokenise actors (actors/train_data.py's TrainDecode)
-> shuffle (block order here, a local buffer in each worker); Ray Train splits it over the workers.
"""

from __future__ import annotations

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


def drop_units(batch, ids: list[str]):
    """(map_batches, pyarrow) the rows whose unit_id is not in `ids`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return batch.filter(pc.invert(pc.is_in(batch["unit_id"], value_set=pa.array(ids, pa.string()))))


def dataset(job: TrainJob, paths: list[str], tokenizer_folder: str, exclude: list[str] = ()):
    """The training stream; rows whose unit_id is in `exclude` (held-out validation rows) never reach it."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from actors.train_data import TrainDecode

    fs, _ = arrow_filesystem(job.trainset, job.storage)
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["unit_id", "gt_png", "lr_png", "prompt"])
    if exclude:
        ds = ds.map_batches(drop_units, fn_kwargs={"ids": list(exclude)}, batch_format="pyarrow", batch_size=None)
    if job.shuffle:
        ds = ds.randomize_block_order(seed=job.recipe.seed)
    return ds.map_batches(TrainDecode, fn_constructor_kwargs={"tokenizer_folder": tokenizer_folder,
                                                             "storage": job.storage.model_dump(mode="json")},
                          batch_size=job.decode_batch, num_cpus=job.decode_cpus,
                          # grows with the training workers (an autoscaling cluster adds CPUs with the GPU nodes)
                          compute=ActorPoolStrategy(min_size=job.decode_actors,
                                                    max_size=max(job.decode_actors, 2 * job.workers)))
