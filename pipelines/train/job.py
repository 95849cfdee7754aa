"""TrainJob: the `ugcsr train` job's configuration, and the checkpoint naming it implies (RUN/train/checkpoint-<step>)."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.storage import StorageConfig, check_no_userinfo, is_remote
from srmodel.config import ModelConfig
from srmodel.train.config import TrainRecipe

CHECKPOINT_PREFIX = "checkpoint-"
# Host memory reserved per training worker on GPU clusters (GiB): the measured load peak at real size (bf16
# frozen parts, 9.73 GB = 9.06 GiB, bench/stage_memory.py; the weights pass through host memory on their way
# to the GPU) plus 25 %, as for the upscale stages (docs/performance.md).
TRAIN_WORKER_MEMORY_GB = 12.0
CHECKPOINT_FILES = {"state.json", "trainable.safetensors", "optimizer.pt", "rng.pt", "metrics.parquet"}


class TrainJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    trainset: str = Field(description="folder/prefix with shard-*.parquet from build-trainset")
    run: str = Field(description="run folder/prefix: checkpoints, export, metrics (re-using it resumes)")
    model: ModelConfig
    recipe: TrainRecipe = TrainRecipe()
    max_steps: int = Field(ge=1, description="optimizer steps in total (a resumed run continues up to it)")
    checkpoint_every: int = Field(10_000, ge=1, description="optimizer steps between checkpoints (authors: 10k)")
    validate_every: int | None = Field(None, ge=1, description="steps between validation pictures (a multiple "
                                       "of checkpoint_every; default: every checkpoint)")
    val_images: int = Field(4, ge=0, description="held-out LR images super-resolved at each validation")
    holdout_shards: int | None = Field(None, ge=0, description="whole shards kept out of training for validation; "
                                       "default: none, only the val_images rows validated are kept out")
    workers: int = Field(1, ge=1)
    gpus_per_worker: float | None = Field(None, ge=0, description="default: 1 if the cluster has GPUs, else 0 (gloo)")
    cpus_per_worker: float = Field(1.0, gt=0)
    memory_gb: float | None = Field(None, ge=0, description="host memory (GiB) reserved per worker; default "
                                    f"{TRAIN_WORKER_MEMORY_GB:g} on GPU clusters (docs/performance.md), none on CPU-only "
                                    "ones or for the tiny preset")
    shuffle: bool = Field(True, description="seeded shard order + local shuffle buffer; false reproduces the authors")
    shuffle_buffer: int = Field(64, ge=1, description="rows in each worker's local shuffle buffer")
    decode_actors: int = Field(2, ge=1, description="CPU actors decoding PNGs and tokenising prompts at the start; "
                               "the pool grows to 2 per training worker when Ray Data sees it starved")
    decode_cpus: float = Field(0.5, gt=0)
    decode_batch: int = Field(8, ge=1)
    materialize: bool = Field(False, description="decode the training set once into Ray's object store; epochs "
                              "then skip the decode stage (small sets with many epochs; it must fit in memory)")
    data_cpu_limit: float | None = Field(None, gt=0, description="cap on the CPUs Ray Data may use (shared clusters)")
    max_failures: int = Field(3, ge=0, description="worker-group restarts (each resumes from the last checkpoint)")
    keep_checkpoints: int | None = Field(None, ge=1, description="keep only the newest N (default: all)")
    log_every: int = Field(1, ge=1, description="optimizer steps between progress lines")
    run_name: str = Field("train", pattern=r"^[A-Za-z0-9_.-]+$")
    allow_cpu: bool = Field(False, description="train a full-size preset on a cluster with no GPU and no GPU node "
                                               "type (very slow, fp32 on gloo)")
    shared_fs: bool = Field(False, description="local TRAINSET/RUN/weights paths are on a filesystem every node "
                                               "mounts at the same path")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI on "
                                            "the driver); when set, rank 0 logs params, metrics and validation "
                                            "pictures there (needs the `mlflow` extra)")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, "
                                          "else ugcsr-train)")
    storage: StorageConfig = StorageConfig()
    address: str | None = None

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        return check_no_userinfo(v, "mlflow_tracking_uri")  # the job is kept in train_job.json

    @field_validator("trainset", "run")
    @classmethod
    def _absolute_local(cls, v: str) -> str:
        check_no_userinfo(v, "path")
        return v if is_remote(v) else os.path.abspath(os.path.expanduser(v.removeprefix("file://")))

    @model_validator(mode="after")
    def _check(self):
        v = self.validate_every
        if v is not None and v % self.checkpoint_every:
            raise ValueError(f"validate_every ({v}) must be a multiple of checkpoint_every ({self.checkpoint_every}): "
                             "validation pictures are saved beside a checkpoint")
        return self


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"
