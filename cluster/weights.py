"""Weights from object storage: staged once per node into a local cache before any model loads.

Any weights path may be an fsspec URI (`s3://bucket/weights/checkpoint-90000`, `gs://...`).
`stage_uris` turns each remote one into a local copy under a staging folder the caller names
(actors/staging.py maps a model's source to URIs and back; this module knows URIs and folders only):

- one download per node: the actors of a node take an exclusive file lock; the first downloads,
  the others find the copy done;
- atomic: files go to a temp folder renamed into place only when every file is complete;
- checked: each file's size (and ETag where the store gives one) must match the listing, before and
  after the download; the listing is kept beside the copy, so a later run reuses it as long as the
  objects are unchanged and fetches them again when they changed;
- a missing object or an empty prefix is a `FileNotFoundError` naming the URI (`check_uris` runs the
  same listing on the driver, so the job fails at start instead of in every actor).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .storage import StorageConfig, filesystem, is_remote

STATE_FILE = ".ugcsr-staged.json"


def remote_uris(uris: Mapping[str, str]) -> dict[str, str]:
    """The entries of {name: path or URI} that live on object storage."""
    return {name: uri for name, uri in uris.items() if uri and is_remote(uri)}


def listing(uri: str, storage: StorageConfig) -> dict[str, dict]:
    """{relative path: {"size", "etag"}} of the object or every object under the prefix; error if none."""
    fs, path = filesystem(uri, storage)
    path = path.rstrip("/")
    try:
        info = fs.info(path)  # transient errors: retried by botocore (StorageConfig)
    except FileNotFoundError:
        info = None
    if info is not None and info.get("type") != "directory":
        return {"": _entry(info)}
    found = fs.find(path, detail=True)
    files = {k[len(path):].lstrip("/"): _entry(v) for k, v in found.items() if v.get("type") != "directory"}
    if not files:
        raise FileNotFoundError(f"weights {uri} do not exist (no object and no objects under that prefix); "
                                "upload them there or fix the path")
    return files


def _entry(info: dict) -> dict:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or ""
    return {"size": int(info.get("size") or 0), "etag": str(etag).strip('"')}


def check_uris(uris: Mapping[str, str], storage: StorageConfig) -> dict[str, dict[str, dict]]:
    """The listing of every remote entry of {name: URI} (raises on a missing one). Cheap: listing only."""
    return {name: listing(uri, storage) for name, uri in remote_uris(uris).items()}


def stage_uris(uris: Mapping[str, str], storage: StorageConfig, root: str | Path) -> dict[str, str]:
    """{name: local staged copy under root} for every remote entry of {name: URI} (downloaded if needed)."""
    remote = remote_uris(uris)
    if not remote:
        return {}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return {name: str(stage_uri(uri, storage, root)) for name, uri in remote.items()}


def stage_uri(uri: str, storage: StorageConfig, root: Path) -> Path:
    """Local copy of one object or prefix: root/<hash of uri>/<basename>; downloaded under a node-wide lock."""
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    slot = root / key
    target = slot / (uri.rstrip("/").rsplit("/", 1)[-1] or "object")
    slot.mkdir(parents=True, exist_ok=True)
    with open(slot / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other actors of this node wait here, then reuse the copy
        files = listing(uri, storage)
        state = slot / STATE_FILE
        if target.exists() and state.is_file() and json.loads(state.read_text()) == files:
            return target
        _download(uri, files, storage, slot, target)
        state.write_text(json.dumps(files, sort_keys=True))
    return target


def _download(uri: str, files: dict[str, dict], storage: StorageConfig, slot: Path, target: Path) -> None:
    fs, path = filesystem(uri, storage)
    path = path.rstrip("/")
    tmp = Path(tempfile.mkdtemp(prefix=".part-", dir=slot))
    try:
        single = list(files) == [""]
        for rel, meta in files.items():
            src = path if single else f"{path}/{rel}"
            dst = tmp / "object" if single else tmp / "tree" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(src, str(dst))
            got = dst.stat().st_size
            if got != meta["size"]:
                raise OSError(f"staging {uri}: {rel or 'the object'} has {got} bytes, the store lists "
                              f"{meta['size']} (partial download or the object changed); run again")
        (slot / STATE_FILE).unlink(missing_ok=True)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.rename(tmp / "object" if single else tmp / "tree", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
