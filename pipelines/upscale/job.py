"""UpscaleJob: the whole job's configuration (YAML file, then CLI overrides)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.decode import DEFAULT_MAX_PIXELS
from cluster.storage import StorageConfig, check_no_userinfo, is_remote
from srmodel.config import ModelConfig


# Host memory reserved per actor on GPU clusters (GiB): measured load peaks (bench/stage_memory.py, real size,
# docs/performance.md "Memory") x 1.25, rounded up to 0.5 GiB.
SR_MEMORY_GB = 9.0  # SR fp16 load peak 7.62 GB (7.10 GiB; fold_kv loads the UNet in fp32 first)
SEMANTIC_MEMORY_GB = 4.0  # SAM2 (peak 1.23 GB with one image) + RAM/DAPE tagger (2.48 GB) - 0.55 GB shared imports


class ResourcesConfig(BaseModel):
    """Actor pools; sizes default from the cluster's resources (docs/pipeline.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: Literal["fused", "split"] = Field(
        "fused", description="fused: semantic + SR in one actor per GPU; split: a semantic pool and an SR pool")
    sr_actors: int | None = Field(None, ge=1, description="fixed SR pool size; default: planned from the nodes")
    sr_actors_max: int | None = Field(None, ge=1, description="upper bound of the (autoscaling) SR pool")
    semantic_actors: int | None = Field(None, ge=1, description="split layout: default one per 8 GPUs, at least 1")
    sr_gpus: float | None = Field(None, gt=0, le=8, description="GPU share of one SR actor; default 1 (fused) or "
                                  "1 - semantic_actors x semantic_gpus (split)")
    semantic_gpus: float | None = Field(None, gt=0, le=1, description="split layout: default min(0.25, 0.9 / (G + 1) / semantic_actors), G the most GPUs on one node")
    sr_cpus: float = Field(1.0, gt=0)
    semantic_cpus: float = Field(0.5, gt=0)
    io_cpus: float = Field(0.25, gt=0, description="CPU share of a read/decode task")
    encode_cpus: float = Field(1.0, gt=0, description="CPU share of an encode/write task (PNG/WebP encoding is CPU-bound)")
    sr_batch: int = Field(8, ge=1)
    semantic_batch: int = Field(8, ge=1)
    io_batch: int = Field(32, ge=1, description="rows per read/decode task; they are sorted by working size inside it")
    io_tasks: int | None = Field(None, ge=1, description="concurrent read/decode and write tasks (each stage); "
                                 "default: from the cluster's CPUs")
    fetch_threads: int = Field(8, ge=1, description="concurrent object fetches inside one read task")
    read_batch_pixels: int = Field(128_000_000, ge=1, description="decoded pixels a read task holds before it hands "
                                   "its rows on (fetched and decoded fetch_threads at a time): 32 large photos never "
                                   "sit decoded in one task")
    read_memory_gb: float | None = Field(None, ge=0, description="host memory (GiB) reserved per read/decode task; "
                                         "default on GPU clusters: two read_batch_pixels of RGB plus fetch_threads x "
                                         "32 MiB of fetched bytes; none on CPU-only ones or for the tiny preset")
    sr_call_pixels: int = Field(512_000_000, ge=1, description="output pixels an SR call hands on at a time: a "
                                "batch whose outputs hold more is run and handed on in consecutive parts (a whole "
                                "batch of 8 x 256 MP outputs would be 6 GB in the SR actor and in a write task)")
    write_memory_gb: float | None = Field(None, ge=0, description="host memory (GiB) reserved per write/encode task, "
                                          "which holds one SR batch of outputs (sr_batch x output pixels x 3 bytes, "
                                          "plus the encoded copies); default none: set it when outputs are large "
                                          "(x4 of 64 MP inputs: 8 x 256 MP x 3 B = 6 GiB) so Ray runs fewer at once")
    sr_memory_gb: float | None = Field(None, ge=0, description=f"host memory (GiB) reserved per SR actor; "
                                       f"default {SR_MEMORY_GB:g} on GPU clusters (fused actors add semantic_memory_gb), none on CPU-only ones or "
                                       "for the tiny preset")
    semantic_memory_gb: float | None = Field(None, ge=0, description="same for a semantic actor; default "
                                             f"{SEMANTIC_MEMORY_GB:g} on GPUs")


class RetryConfig(BaseModel):
    """Bounded retries on every stage (Ray's defaults retry a crashing input forever)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_max_retries: int = Field(3, ge=0, description="Ray task retries of read/decode, write, manifest and planning tasks")
    actor_max_task_retries: int = Field(4, ge=0, description="retries of a batch whose SR/semantic actor died")
    actor_max_restarts: int = Field(-1, ge=-1, description="restarts of one actor over the whole run (-1: no limit; "
                                    "a crashing input is bounded per batch by the crash journal instead)")
    max_crashes_per_image: int = Field(1, ge=1, description="worker deaths attributed to one image before it gets "
                                       "an error row (WorkerCrashed) instead of another try")
    max_device_faults: int = Field(3, ge=1, description="device errors or deaths on one GPU, with different images, "
                                   "that quarantine it for the run (a GPU that fails a fresh self-test or model load "
                                   "is quarantined at once); its actor stops and new actors avoid its node")
    max_errored_blocks: int = Field(10, ge=-1, description="Ray Data backstop: blocks that may fail for good before the "
                                    "run stops; their images are reported as unaccounted and redone on resume")


class UpscaleJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    src: str
    dst: str
    model: ModelConfig
    storage: StorageConfig = StorageConfig()
    resources: ResourcesConfig = ResourcesConfig()
    retries: RetryConfig = RetryConfig()
    # A Literal: errors list the allowed values.
    format: Literal["png", "webp", "jpeg"] = Field(
        "png", description="png (lossless, default) | webp | jpeg: see docs/pipeline.md for the measured encode costs")
    quality: int = Field(95, ge=1, le=100)
    limit: int | None = Field(None, ge=1)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger inputs get an error row")
    max_output_pixels: int = Field(
        256_000_000, ge=1, description="images whose output would be larger get an error row (bounded memory)"
    )
    allow_src: list[str] = Field(
        default_factory=list, description="URI prefixes (another bucket, a local root, an https host) the rows of a "
        ".txt/.parquet SRC list may name besides the list's own bucket (remote) or folder (local); see docs/cluster.md")
    max_input_bytes: int = Field(
        256 * 2**20, ge=1, description="larger source objects get an error row without being read past the limit")
    time_budget_s: float | None = Field(
        1800.0, gt=0, description="SR seconds one image may take (checked between denoising steps); past it the "
                                  "image gets an error row and the GPU moves on. None: no limit")
    relist: bool | None = Field(
        None, description="list SRC again instead of reusing the listing under DST/_state/; "
                          "None: local folders are listed on every run (cheap), remote prefixes once"
    )
    base_seed: int = 0
    address: str | None = None
    cache_semantic: str | None = Field(
        None, description="URI where SAM2 tokens are kept per image; re-runs with other sampler settings reuse them"
    )
    def params_hash(self) -> str:
        """Every setting that changes an output file: the model's pixel settings, seed base, format."""
        ident = f"{self.model.params_hash()}|{self.base_seed}|{self.format}|{self.quality}"
        return hashlib.sha256(ident.encode()).hexdigest()[:16]

    @field_validator("allow_src")
    @classmethod
    def _allowed_roots(cls, v: list[str]) -> list[str]:
        out = []
        for root in v:
            check_no_userinfo(root, "allow_src entry")
            if "::" in root or not root.strip():
                raise ValueError(f"allow_src entry {root!r} is not a folder or URI prefix")
            root = root[len("file://"):] if root.startswith("file://") else root
            out.append(root if is_remote(root) else os.path.abspath(os.path.expanduser(root)))
        return out

    @field_validator("src", "dst", "cache_semantic")
    @classmethod
    def _absolute_local(cls, v: str | None) -> str | None:
        if v is None:
            return None
        check_no_userinfo(v, "path")
        # Actors may run in another working directory (or on another node sharing the filesystem).
        if v.startswith("file://"):
            v = v[len("file://"):]
        return v if is_remote(v) else os.path.abspath(os.path.expanduser(v))

    allow_cpu: bool = Field(False, description="run a full-size preset even when the cluster has no GPU (very slow)")
    shared_fs: bool = Field(
        False, description="local SRC/DST/weights paths are on a filesystem every node mounts at the same path")
    actor_start_timeout_s: float | None = Field(
        None, gt=0, description="fail with a clear error when the actor pools cannot start (e.g. no GPU fits); "
        "default 900 s, 1800 s when an autoscaler adds the GPU nodes (a cold node pulls the image and stages "
        "~13 GB of weights)")
    manifest_rows_per_file: int = Field(
        1024, ge=1, description="rows per manifest part (plus at most one write batch; `ugcsr manifest compact` "
        "merges parts later)")
    manifest_max_age_s: float = Field(
        60.0, gt=0, description="a manifest part is written once its oldest row waited this long, full or not: "
        "a killed driver loses the rows of at most this much work (their images are redone on resume)")
    plan_buckets: int | None = Field(None, ge=1, le=4096, description="hash buckets of the listing and resume anti-join; "
                                     "default: one per 250k listed images (counted once listed)")
    plan_tasks: int | None = Field(None, ge=1, description="parallel listing tasks; default: from the cluster's CPUs")
    execution_images: int = Field(
        1_000_000, ge=1, description="images per Ray Data execution: a run is a loop of executions over groups of "
        "todo shards (one lease, run id and summary), because Ray Data keeps a record per output block on the "
        "driver for an execution's lifetime; a shard is never split, so a group holds at least one")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"job config {path} must be a mapping of settings, got {type(data).__name__}")
    return data
