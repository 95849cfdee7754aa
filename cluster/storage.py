"""Object storage through fsspec: local folders, s3:// (any S3-compatible endpoint), any fsspec URL.

Credentials come from the usual AWS chain (env, profile, instance role) and are
never stored in configs, manifests or logs; only the endpoint is configurable.
"""

from __future__ import annotations

import os
import posixpath
import random
import time
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from pydantic import BaseModel, ConfigDict, Field


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint; default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS"
    )
    region: str | None = None
    retries: int = Field(5, ge=0, description="attempts after the first on a transient error")
    backoff_s: float = Field(0.5, ge=0)

    def s3_options(self) -> dict[str, Any]:
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if self.region:
            client_kwargs["region_name"] = self.region
        return {"client_kwargs": client_kwargs} if client_kwargs else {}


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or URL."""
    storage = storage or StorageConfig()
    options = storage.s3_options() if uri.startswith(("s3://", "s3a://")) else {}
    fs, path = url_to_fs(uri, **options)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join a folder URI/path and relative parts with '/'."""
    return posixpath.join(base.rstrip("/"), *parts) if is_remote(base) else os.path.join(base, *parts)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def uri_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path)


# Errors worth retrying: throttling, 5xx, dropped connections. Everything else is permanent.
TRANSIENT_MARKERS = ("SlowDown", "Throttl", "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500", "502", "504")


def is_transient(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(err).__name__}: {err}"
    return any(m in text for m in TRANSIENT_MARKERS)


def with_retries(fn, storage: StorageConfig, what: str):
    """Call fn(); on a transient error wait with exponential backoff + jitter and try again."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below
            if attempt >= storage.retries or not is_transient(err):
                raise
            time.sleep(storage.backoff_s * (2**attempt) * (0.5 + random.random()))
            attempt += 1


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    storage = storage or StorageConfig()
    fs, path = filesystem(uri, storage)
    return with_retries(lambda: fs.cat_file(path), storage, uri)


def write_bytes_atomic(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Local: temp file + rename in the same folder. Object stores: one PUT (atomic by nature)."""
    storage = storage or StorageConfig()
    fs, path = filesystem(uri, storage)
    if is_local(fs):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with_retries(lambda: fs.pipe_file(path, data), storage, uri)
