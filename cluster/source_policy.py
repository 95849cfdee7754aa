"""Which source URIs a job may read: its SRC, and only the extra roots its owner allowed.

Rows of a `.txt`/`.parquet` list, and rows read back from DST/_state, are data: on a shared
cluster they must not make workers read anything the cluster's identity can reach
(`file:///etc/...`, another team's bucket, the cloud metadata address, `zip://...::` chains).
The read stage asks `refusal(uri)` before any fetch; a refused row gets an error naming the rule.

Defaults: a folder SRC allows what is under it; a list file allows its own bucket (remote) or its
own folder (local). `allow` adds URI prefixes (another bucket, a local root, an https host);
http(s) is allowed only under such a prefix, and never to loopback, private, link-local or
reserved addresses (checked on the resolved address at read time).
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import socket
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict

from .storage import has_userinfo

HTTP = ("http", "https")


class SourcePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    roots: tuple[str, ...]  # normalised URI prefixes, each ending in "/"
    extensions: tuple[str, ...]  # lower-case, with the dot

    def refusal(self, uri: str) -> str | None:
        """None when `uri` may be read; else the rule it breaks, for the row's error message."""
        if "::" in uri:
            return "chained URLs ('::') are never read"
        if has_userinfo(uri):
            return "credentials in the URI (user:password@) are never used; the cluster reads with its own identity"
        norm = normalise(uri)
        if norm is None:
            return "not an absolute URI or path"
        path = urlparse(norm).path
        if posixpath.splitext(path)[1].lower() not in self.extensions:
            return f"not an image file (extensions {', '.join(self.extensions)})"
        if ".." in path.split("/"):
            return "'..' in the path"
        if not any(norm.startswith(root) for root in self.roots):
            return (f"outside the allowed sources ({', '.join(self.roots)}); the job's owner may add a root with "
                    "--allow-src")
        scheme = urlparse(norm).scheme
        if scheme in HTTP:
            return _address_refusal(urlparse(norm).hostname or "")
        return None


def normalise(uri: str) -> str | None:
    """A comparable form: `file://` + absolute normalised path for local ones, scheme lower-cased, s3a -> s3."""
    parsed = urlparse(uri)
    if not parsed.scheme or len(parsed.scheme) == 1:  # a bare (or Windows-drive) path
        return "file://" + os.path.normpath(uri) if os.path.isabs(uri) else None
    scheme = parsed.scheme.lower()
    if scheme == "file":
        return "file://" + os.path.normpath(parsed.path) if parsed.path.startswith("/") else None
    scheme = "s3" if scheme == "s3a" else scheme
    host = (parsed.hostname or "") + (f":{parsed.port}" if parsed.port else "")  # userinfo dropped
    return f"{scheme}://{host}{parsed.path}"


def root_of(uri: str) -> str:
    """A root prefix for `uri` (a folder or prefix), ending in '/'."""
    norm = normalise(uri if "://" in uri else os.path.abspath(uri))
    if norm is None:
        raise ValueError(f"{uri!r} is not a URI or path")
    return norm.rstrip("/") + "/"


def policy_for(src: str, allow: list[str] | tuple[str, ...], extensions) -> SourcePolicy:
    """The policy of a job reading SRC: its folder/prefix, or a list file's bucket (remote) or folder (local)."""
    if src.lower().endswith((".txt", ".parquet")):
        if "://" in src and not src.startswith("file://"):
            parsed = urlparse(src)
            own = root_of(f"{parsed.scheme}://{parsed.netloc}")  # a list in s3://b/p/ may name s3://b/...
        else:
            own = root_of(os.path.dirname(os.path.abspath(src.removeprefix("file://"))))
    else:
        own = root_of(src)
    roots = tuple(dict.fromkeys([own, *(root_of(a) for a in allow)]))
    return SourcePolicy(roots=roots, extensions=tuple(sorted(e.lower() for e in extensions)))


def _address_refusal(host: str) -> str | None:
    """http(s) only to public addresses: a list must not reach the metadata service or the cluster's own net."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as err:
        return f"cannot resolve {host!r}: {err}"
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if not addr.is_global or addr.is_multicast:
            return f"{host} resolves to {addr}, a non-public address (loopback, private, link-local or reserved)"
    return None
