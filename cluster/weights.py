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
  same listing on the driver, so the job fails at start instead of in every actor);
- safe keys: S3 keeps keys verbatim, so `w/ckpt/../../x` or `w/ckpt//etc/x` under a prefix would name a
  path outside the staging folder; the listing refuses (`ValueError`) any relative key that is absolute,
  has an empty, `.` or `..` part, a backslash or a NUL, and every destination is checked to resolve
  inside the download's temp folder before anything is written (zero-byte `.../` folder markers are skipped);
- optionally pinned: `sha256=` maps each relative key ('' for a single object) to its hex sha256
  (`read_sha256_list` reads `sha256sum` output); every downloaded file is hashed and must match, a file
  missing from the pin or a pinned file missing from the store is refused, and a cached copy is reused
  only if it was verified against the same pin (the pin's digest is kept in the state file).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .storage import StorageConfig, filesystem, is_remote

STATE_FILE = ".ugcsr-staged.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SUM_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")  # sha256sum: digest, space, ' ' (text) or '*' (binary), path


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
    files = {}
    for key, info in fs.find(path, detail=True).items():
        if info.get("type") == "directory" or (key.endswith("/") and not info.get("size")):
            continue  # folder markers (the S3 console's "Create folder") carry no data
        # Cut exactly the prefix and its one '/': stripping every leading '/' would hide `prefix//etc/x`.
        rel = key[len(path) + 1:] if key.startswith(path + "/") else key
        _check_key(uri, rel)
        files[rel] = _entry(info)
    if not files:
        raise FileNotFoundError(f"weights {uri} do not exist (no object and no objects under that prefix); "
                                "upload them there or fix the path")
    return files


def _check_key(uri: str, rel: str) -> None:
    """Refuse a relative key that is not a plain relative path: staged as-is it could land outside the folder."""
    parts = rel.split("/")
    why = ("it contains a NUL" if "\x00" in rel else "it contains a backslash" if "\\" in rel
           else "it is absolute" if rel.startswith("/")
           else "it has an empty, '.' or '..' path part" if any(p in ("", ".", "..") for p in parts) else None)
    if why:
        raise ValueError(f"weights {uri}: object key {rel!r} under it is not a safe relative path ({why}); "
                         "staging it could write outside the staging folder. Delete or rename that object, "
                         "or point the weights at a prefix without it")


def _entry(info: dict) -> dict:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or ""
    return {"size": int(info.get("size") or 0), "etag": str(etag).strip('"')}


def check_uris(uris: Mapping[str, str], storage: StorageConfig) -> dict[str, dict[str, dict]]:
    """The listing of every remote entry of {name: URI} (raises on a missing one). Cheap: listing only."""
    return {name: listing(uri, storage) for name, uri in remote_uris(uris).items()}


def stage_uris(uris: Mapping[str, str], storage: StorageConfig, root: str | Path,
               sha256: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, str]:
    """{name: local staged copy under root} for every remote entry of {name: URI} (downloaded if needed).

    sha256: {name: {relative key: hex sha256}} (see stage_uri); when given, every remote entry needs one.
    """
    remote = remote_uris(uris)
    if not remote:
        return {}
    if sha256 is not None and (unpinned := sorted(set(remote) - set(sha256))):
        raise ValueError(f"weights {', '.join(f'{n} ({remote[n]})' for n in unpinned)} have no sha256 pin "
                         "while the others are pinned; add their digests to the pin list")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return {name: str(stage_uri(uri, storage, root, None if sha256 is None else sha256[name]))
            for name, uri in remote.items()}


def stage_uri(uri: str, storage: StorageConfig, root: Path, sha256: Mapping[str, str] | None = None) -> Path:
    """Local copy of one object or prefix: root/<hash of uri>/<basename>; downloaded under a node-wide lock.

    sha256: {relative key within uri ('' for a single object): hex sha256}; every file is checked against it.
    """
    pin = _pin(uri, sha256)
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    slot = Path(root) / key
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    target = slot / (name if name not in ("", ".", "..") else "object")  # never the slot itself or its parent
    slot.mkdir(parents=True, exist_ok=True)
    with open(slot / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other actors of this node wait here, then reuse the copy
        files = listing(uri, storage)
        if pin is not None and (missing := sorted(set(pin) - set(files))):
            raise ValueError(f"weights {uri}: pinned file(s) {missing} are not in the store; "
                             "upload them or fix the pin list")
        # Unpinned: the listing alone, as before (existing caches stay valid). Pinned: also the pin's digest,
        # so a copy staged unpinned or under another pin is fetched and verified again.
        record = files if pin is None else {"listing": files, "sha256_pin": _digest(pin)}
        state = slot / STATE_FILE
        if target.exists() and state.is_file() and json.loads(state.read_text()) == record:
            return target
        _download(uri, files, storage, slot, target, pin)
        state.write_text(json.dumps(record, sort_keys=True))
    return target


def _pin(uri: str, sha256: Mapping[str, str] | None) -> dict[str, str] | None:
    if sha256 is None:
        return None
    pin = {rel: str(digest).strip().lower() for rel, digest in sha256.items()}
    bad = sorted(rel for rel, digest in pin.items() if not _SHA256.fullmatch(digest))
    if bad:
        raise ValueError(f"weights {uri}: the pin of {bad} is not a sha256 (64 hex digits); fix the pin list")
    return pin


def _digest(pin: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(pin, sort_keys=True).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_sha256_list(text: str) -> dict[str, str]:
    """{path: lowercase hex sha256} from `sha256sum` output (`<hex>  <path>` or `<hex> *<path>` lines).

    Blank lines and `#` comments are skipped; a leading `./` is dropped (`find . -exec sha256sum`); any other
    line, or a path listed twice with different digests, is a ValueError naming the line.
    """
    pins: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _SUM_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"sha256 list line {number} is not `<sha256>  <path>` (sha256sum output): {line!r}")
        digest, rel = match.group(1).lower(), match.group(2).removeprefix("./")
        if pins.setdefault(rel, digest) != digest:
            raise ValueError(f"sha256 list line {number}: {rel!r} is listed twice with different digests")
    return pins


def _download(uri: str, files: dict[str, dict], storage: StorageConfig, slot: Path, target: Path,
              pin: Mapping[str, str] | None = None) -> None:
    fs, path = filesystem(uri, storage)
    path = path.rstrip("/")
    tmp = Path(tempfile.mkdtemp(prefix=".part-", dir=slot))
    inside = os.path.realpath(tmp)
    try:
        single = list(files) == [""]
        for rel, meta in files.items():
            src = path if single else f"{path}/{rel}"
            dst = tmp / "object" if single else tmp / "tree" / rel
            # Defence in depth behind listing()'s key check: nothing is written outside the temp folder.
            if os.path.commonpath([inside, os.path.realpath(dst)]) != inside:
                raise ValueError(f"staging {uri}: object key {rel!r} would be written outside the staging "
                                 "folder; delete or rename that object")
            dst.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(src, str(dst))
            got = dst.stat().st_size
            if got != meta["size"]:
                raise OSError(f"staging {uri}: {rel or 'the object'} has {got} bytes, the store lists "
                              f"{meta['size']} (partial download or the object changed); run again")
            if pin is not None and (found := _sha256_file(dst)) != pin.get(rel):
                expected = pin.get(rel) or "none (the file is not in the pin list)"
                raise ValueError(f"staging {uri}: {rel or 'the object'} has sha256 {found}, the pin expects "
                                 f"{expected}; the weights differ from the pinned release: fix the pin list "
                                 "or the objects")
        (slot / STATE_FILE).unlink(missing_ok=True)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.rename(tmp / "object" if single else tmp / "tree", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
