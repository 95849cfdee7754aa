"""Object storage through fsspec: local folders, s3:// (any S3-compatible endpoint), any fsspec URL.

Credentials come from the usual AWS chain (env, profile, instance role) and are
never stored in configs, manifests or logs; only the endpoint is configurable.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from pydantic import BaseModel, ConfigDict, Field, field_validator


class StorageConfig(BaseModel):
    """How to reach object storage; retries are the storage client's own (botocore), not ours."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint; default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS"
    )
    region: str | None = None
    retry_mode: str = Field(
        "standard", pattern="^(standard|adaptive|legacy)$",
        description="botocore retry mode: standard (exponential backoff, 5xx/throttling/connection errors) or "
                    "adaptive (standard plus client-side rate limiting under throttling)",
    )
    max_attempts: int = Field(6, ge=1, description="botocore attempts per request, the first included")
    body_retries: int = Field(
        3, ge=1, description="attempts of a GET whose body breaks off mid-stream (botocore cannot see those)"
    )
    connect_timeout_s: float = Field(10, gt=0)
    read_timeout_s: float = Field(60, gt=0)

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        return check_no_userinfo(v, "endpoint_url")

    def s3_options(self) -> dict[str, Any]:
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if self.region:
            client_kwargs["region_name"] = self.region
        # One retry layer per failure kind: botocore retries requests (it sees HTTP codes and connection
        # errors); read_bytes re-issues a GET whose body broke off after botocore returned.
        config = {"retries": {"mode": self.retry_mode, "max_attempts": self.max_attempts},
                  "connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s}
        return {"client_kwargs": client_kwargs, "config_kwargs": config}


# scheme://user[:password]@host: credentials in a URI end up in manifests, job tables and logs.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/@\s]*)@")


def has_userinfo(uri: str) -> bool:
    return bool(_USERINFO.match(str(uri)))


def redact(uri: str) -> str:
    """`uri` with any user:password replaced by REDACTED (for whatever is recorded or printed)."""
    return _USERINFO.sub(r"\1REDACTED@", str(uri), count=1)


def check_no_userinfo(uri: str | None, what: str) -> str | None:
    """`uri` itself; a ValueError (without the secret) when it carries user:password@."""
    if uri is not None and has_userinfo(uri):
        raise ValueError(f"{what} {redact(uri)} carries credentials (user:password@): they would be recorded in "
                         "manifests, job tables and logs; give the cluster its own credentials (an instance role, "
                         "a Kubernetes secret as environment; docs/cluster.md) and drop them from the URI")
    return uri


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or URL."""
    storage = storage or StorageConfig()
    options = storage.s3_options() if uri.startswith(("s3://", "s3a://")) else {}
    fs, path = url_to_fs(uri, **options)
    if options:
        # s3fs wraps every call in its own retry loop (and a GET in a second one), on top of botocore's
        # attempts: one attempt each, so the retries are botocore's alone (read_bytes handles broken bodies).
        fs.retries = 1
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join a folder URI/path and relative parts with '/'; a part that could leave `base` is refused.

    Parts often come from data (output keys, ids read back from DST/_state, object keys): an absolute
    part would replace the base (os.path.join), `..` climbs out of it, `://` or `::` names another store.
    """
    for part in parts:
        if part != "":  # join(base, "") is base with a trailing separator
            check_relative(part)
    return posixpath.join(base.rstrip("/"), *parts) if is_remote(base) else os.path.join(base, *parts)


def check_relative(part: str) -> str:
    """`part` itself when it is a relative path that stays below its folder; else ValueError naming it."""
    text = str(part)
    segments = text.replace("\\", "/").split("/")
    if (not text or text.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", text) or "://" in text
            or "::" in text or "\x00" in text or ".." in segments):
        raise ValueError(f"refusing the path part {text!r}: parts joined under a folder must be relative, without "
                         "'..', '~', '://' or '::' (it may come from a listing or a state file that was tampered with)")
    return text


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def uri_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path)


def _client_error(err: BaseException):
    """The botocore ClientError behind `err` (s3fs translates them into OSErrors and keeps the cause)."""
    from botocore.exceptions import ClientError

    return _in_chain(err, (ClientError,))


def _in_chain(err: BaseException | None, kinds: tuple):
    """The first exception of `kinds` in err's cause/context chain (a few links deep), else None."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, kinds):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def error_code(err: BaseException) -> str:
    """A stable name for a storage error: the S3 error code or HTTP status when there is one, else the type."""
    client = _client_error(err)
    if client is not None:
        info = client.response.get("Error", {})
        status = client.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(info.get("Code") or (f"HTTP{status}" if status else type(client).__name__))
    return type(err).__name__


def _broken_body(err: BaseException) -> bool:
    """The response came back but its body broke off (botocore has already returned: it cannot retry this)."""
    from botocore.exceptions import ResponseStreamingError
    from urllib3.exceptions import IncompleteRead

    kinds: tuple = (ResponseStreamingError, IncompleteRead)
    try:
        from aiohttp import ClientPayloadError

        kinds += (ClientPayloadError,)
    except ImportError:  # pragma: no cover - s3fs brings aiohttp
        pass
    return _in_chain(err, kinds) is not None


class TooLarge(ValueError):
    """An object over the caller's byte limit (nothing past the limit was fetched)."""


def read_bytes(uri: str, storage: StorageConfig | None = None, max_bytes: int | None = None,
               span: tuple[int, int] | None = None) -> bytes:
    """An object's bytes. Request failures are retried by botocore; a body cut mid-stream is re-fetched here.

    `max_bytes`: one ranged read of at most max_bytes + 1 bytes; more than max_bytes is a TooLarge error,
    so a huge object never sits whole in a worker's memory. `span=(start, end)`: bytes start..end-1 only
    (one ranged GET); fewer bytes than that is a cut body, re-fetched.
    """
    storage = storage or StorageConfig()
    fs, path = filesystem(uri, storage)
    for attempt in range(1, storage.body_retries + 1):
        try:
            if span is not None:
                data = fs.cat_file(path, start=span[0], end=span[1])
                if len(data) != span[1] - span[0]:
                    from urllib3.exceptions import IncompleteRead

                    raise IncompleteRead(len(data), span[1] - span[0])  # a _broken_body: fetched again
                return data
            if max_bytes is None:
                return fs.cat_file(path)
            data = fs.cat_file(path, start=0, end=max_bytes + 1)
            if len(data) > max_bytes:
                raise TooLarge(f"{redact(uri)} is larger than max_input_bytes={max_bytes}; raise the limit to read it")
            return data
        except Exception as err:
            if attempt == storage.body_retries or not is_remote(uri) or not _broken_body(err):
                raise
    raise AssertionError("unreachable")


def s3_key_pages(fs: fsspec.AbstractFileSystem, bucket: str, prefix: str, *, start_after: str | None = None,
                 page_size: int = 1000):
    """Pages of the keys (as "bucket/key" paths) that start with `prefix` as a string, in key order, one
    ListObjectsV2 request each: yields (paths, more_follow). Keys only, never a dict per object (s3fs's ls/find)."""
    kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
    if start_after:
        kw["StartAfter"] = start_after
    while True:
        out = fs.call_s3("list_objects_v2", **kw)
        more = bool(out.get("IsTruncated"))
        yield [f"{bucket}/{o['Key']}" for o in out.get("Contents", [])], more
        if not more:
            return
        kw["ContinuationToken"] = out["NextContinuationToken"]


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols


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
    fs.pipe_file(path, data)
