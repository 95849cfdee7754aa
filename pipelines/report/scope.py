"""Where `ugcsr report` may read images from, and where it may write its page.

The manifest is data: a row's src_uri/dst_uri may name any URL (an internal
HTTP service) or any local file. The report reads only URIs under the run's
SRC or DST, so building a page never fetches or publishes anything else.

A URI is under a root when, remote, it has the root's scheme and bucket/host
and its key starts with the root's prefix (no `..` segment); local, when its
realpath is inside the root's realpath (symlinks cannot lead out).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from urllib.parse import unquote

OUT_OF_SCOPE = "not under the run's SRC/DST"
_SCHEME_ALIASES = {"s3a": "s3", "gcs": "gs"}  # spellings fsspec treats as one store


class OutOfScope(ValueError):
    """A URI the report will not read; str() is the note the page shows."""


def is_list_file(uri: str) -> bool:
    """SRC given as a list of URIs (as `pipelines.upscale.listing` reads SRC)."""
    return uri.lower().endswith((".parquet", ".txt"))


@dataclass(frozen=True)
class _Root:
    scheme: str  # "" for a local path
    netloc: str
    path: str  # local: a realpath; remote: the key prefix, no slash at either end ("" for a whole bucket)


def _local_path(uri: str) -> str | None:
    """The realpath of a local path or file:// URI; None for file://<host>/... (not this machine's)."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
        if not uri.startswith("/"):
            return None
    elif "://" in uri:
        return None
    return os.path.realpath(uri)


def _parse(uri: str) -> _Root | None:
    """The URI as a comparable root; None for what cannot be judged (empty, dot segments, a foreign file host)."""
    if not uri:
        return None
    if "://" not in uri or uri.startswith("file://"):
        path = _local_path(uri)
        return _Root("", "", path) if path else None
    scheme, rest = uri.split("://", 1)
    netloc, _, key = rest.partition("/")
    if not scheme or not netloc:
        return None
    # Judged on the decoded key too: an HTTP server would resolve %2e%2e (and some a backslash) as `..`.
    for seg in unquote(key).replace("\\", "/").split("/"):
        if seg in (".", ".."):
            return None
    scheme = scheme.lower()
    return _Root(_SCHEME_ALIASES.get(scheme, scheme), netloc.lower(), "/".join(s for s in key.split("/") if s))


def _under(uri: _Root, root: _Root) -> bool:
    if (uri.scheme, uri.netloc) != (root.scheme, root.netloc):
        return False
    if not uri.scheme:
        return os.path.commonpath([uri.path, root.path]) == root.path
    return not root.path or uri.path == root.path or uri.path.startswith(root.path + "/")


def folder_of_list(uri: str) -> str:
    """The folder (local) or bucket/prefix (remote) holding a list file."""
    if "://" in uri and not uri.startswith("file://"):
        scheme, rest = uri.split("://", 1)
        netloc, _, key = rest.partition("/")
        return f"{scheme}://{netloc}/{posixpath.dirname(key)}"
    return os.path.dirname(_local_path(uri) or uri) or "."


def src_root(src: str | None) -> str | None:
    """What of SRC the report may read: the folder/prefix, or for a list file the folder holding it.

    A list's entries may be anywhere its run could read; the report trusts only the list's own folder
    (and DST, where the outputs are): the list is as much data as the manifest.
    """
    if not isinstance(src, str) or not src:
        return None
    return folder_of_list(src) if is_list_file(src) else src


@dataclass(frozen=True)
class ReadScope:
    """The roots (folders/prefixes, as URIs or paths) the report may read under."""

    roots: tuple[str, ...]

    @classmethod
    def of(cls, *roots: str | None) -> "ReadScope":
        return cls(tuple(r for r in roots if isinstance(r, str) and r))

    def with_root(self, root: str | None) -> "ReadScope":
        return ReadScope.of(*self.roots, root)

    def allows(self, uri: str | None) -> bool:
        parsed = _parse(uri) if isinstance(uri, str) else None
        if parsed is None:
            return False
        return any(root is not None and _under(parsed, root) for root in map(_parse, self.roots))

    def check(self, uri: str | None, note: str = OUT_OF_SCOPE) -> str:
        """uri, or OutOfScope(note) when it is not under a root."""
        if not self.allows(uri):
            raise OutOfScope(note)
        return uri  # type: ignore[return-value]


def local_overlap(a: str | os.PathLike, b: str | None) -> bool:
    """Whether local path a and local path/URI b are the same, or one holds the other (realpaths); False for remote b."""
    if not b:
        return False
    pb = _local_path(str(b))
    if pb is None:
        return False
    pa = os.path.realpath(a)
    common = os.path.commonpath([pa, pb])
    return common in (pa, pb)
