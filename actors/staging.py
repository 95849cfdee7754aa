"""A model config whose weights on object storage are staged on this node before an actor loads them.

The model's source names its files (`ModelSource.paths()`); `cluster.weights` stages URIs into a folder.
This is where the two meet, so that infrastructure never needs to know the model.
"""

from __future__ import annotations

from pathlib import Path

from cluster.storage import StorageConfig
from cluster.weights import remote_uris, stage_uris
from srmodel.config import ModelConfig, ModelSource
from srmodel.tiny import default_cache_dir


def stage_source(source: ModelSource, storage: StorageConfig | None = None,
                 root: str | Path | None = None) -> ModelSource:
    """The same source with every remote part replaced by its local staged copy (downloaded if needed;
    checked against `source.sha256` when the source is pinned)."""
    pins = None
    if source.sha256 is not None:  # {file URI: digest} -> {part: {key within the part's URI: digest}}
        pins = {}
        for name, uri in remote_uris(source.paths()).items():
            base = uri.rstrip("/")
            pins[name] = {("" if u == base else u[len(base) + 1:]): d for u, d in source.sha256.items()
                          if u == base or u.startswith(base + "/")}
    staged = stage_uris(source.paths(), storage or StorageConfig(), root or default_cache_dir() / "staged", pins)
    return source.model_copy(update=staged) if staged else source


def staged_path(uri: str | None, storage: StorageConfig | dict | None = None) -> str | None:
    """A local copy of one file or folder given as a URI (staged once per node); local paths as they are."""
    storage = storage if isinstance(storage, StorageConfig) else StorageConfig.model_validate(storage or {})
    if uri is None:
        return None
    return stage_uris({"path": uri}, storage, default_cache_dir() / "staged").get("path", uri)


def staged_model(config: ModelConfig, storage: StorageConfig | dict | None = None) -> ModelConfig:
    """A resolved ModelConfig whose source is all local (what an actor loads from)."""
    storage = storage if isinstance(storage, StorageConfig) else StorageConfig.model_validate(storage or {})
    if config.source is None:
        return config
    return config.model_copy(update={"source": stage_source(config.source, storage)})
