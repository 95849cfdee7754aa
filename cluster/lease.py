"""One writer per DST: a lease object at DST/_state/lease.json.

Taken at the start of a run, renewed in the background, released at the end. A second run on the same
DST while the lease is live fails with a message naming the owner. A lease whose owner died expires
after `ttl_s` (2 minutes; renewed every ttl/5) and may then be taken over; at once when the owner ran on
this machine (same host and PID namespace) and its process is gone, as when a killed driver is rerun.

How "only one wins" is guaranteed depends on the store:
- S3 (and S3-compatible stores that implement conditional writes): `PutObject` with `If-None-Match: *`
  to create, `If-Match: <ETag>` to renew or take over, `DeleteObject` with `If-Match` to release;
- local folders (and shared filesystems with working `flock`): every operation under an exclusive
  lock on DST/_state/.lease.lock;
- other fsspec stores: best effort (check, write, read back), said in the log.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from .storage import StorageConfig, filesystem, is_local, join

log = logging.getLogger("ugcsr")
LEASE_KEY = "_state/lease.json"


class LeaseHeld(RuntimeError):
    """Another live run holds the DST lease."""


def process_space() -> str:
    """This host and PID namespace: a lease written from the same space can be checked by its pid."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return f"{socket.gethostname()}|{ns}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    run_id: str
    acquired_at: float
    expires_at: float
    space: str = ""
    pid: int = 0

    def dead_here(self) -> bool:
        """Its owner ran on this host, in this PID namespace, and that process is gone (a killed driver)."""
        return bool(self.pid) and self.space == process_space() and not _alive(self.pid)

    def describe(self) -> str:
        until = time.strftime("%H:%M:%S UTC", time.gmtime(self.expires_at))
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.acquired_at))
        return f"{self.owner} (run {self.run_id}, since {since}, lease valid until {until} unless renewed)"


def default_owner() -> str:
    job = os.environ.get("UGCSR_SUBMISSION_ID")
    who = f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"
    return f"Ray job {job} ({who})" if job else who


class _LocalBackend:
    """Compare-and-swap on a local or shared filesystem, each step under one flock."""

    def __init__(self, path: str):
        self.path = path
        self.lock_path = os.path.join(os.path.dirname(path), ".lease.lock")

    @contextmanager
    def _locked(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _read(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def read(self):
        with self._locked():
            return self._read()

    def put(self, data: bytes, token: str | None):
        """Write if the current token is `token` (None: if absent); the new token, or None if it lost."""
        with self._locked():
            current = self._read()
            if (current is None) != (token is None) or (current is not None and current[1] != token):
                return None
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
            return hashlib.sha256(data).hexdigest()

    def delete(self, token: str) -> bool:
        with self._locked():
            current = self._read()
            if current is None or current[1] != token:
                return False
            os.remove(self.path)
            return True


class _S3Backend:
    """Conditional writes through boto3 (s3fs does not expose If-Match / If-None-Match)."""

    def __init__(self, uri: str, storage: StorageConfig):
        import boto3

        bucket_key = uri.split("://", 1)[1]
        self.bucket, self.key = bucket_key.split("/", 1)
        kwargs = storage.s3_options().get("client_kwargs", {})
        self.client = boto3.client("s3", **kwargs)

    def _precondition(self, err) -> bool:
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404") or status in (404, 409, 412)

    def read(self):
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return obj["Body"].read(), obj["ETag"]

    def put(self, data: bytes, token: str | None):
        from botocore.exceptions import ClientError

        cond = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **cond)["ETag"]
        except ClientError as err:
            if self._precondition(err):
                return None
            raise

    def delete(self, token: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
            return True
        except ClientError as err:
            if self._precondition(err):
                return False
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NotImplemented", "InvalidArgument"):  # stores without conditional deletes
                current = self.read()
                if current is not None and current[1] == token:
                    self.client.delete_object(Bucket=self.bucket, Key=self.key)
                    return True
                return False
            raise


class _FsspecBackend:
    """Stores without conditional writes: check, write, read back. A narrow race remains (documented)."""

    def __init__(self, uri: str, storage: StorageConfig):
        self.fs, self.path = filesystem(uri, storage)

    def read(self):
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put(self, data: bytes, token: str | None):
        current = self.read()
        if (current is None) != (token is None) or (current is not None and current[1] != token):
            return None
        self.fs.pipe_file(self.path, data)
        again = self.read()
        return again[1] if again and again[0] == data else None

    def delete(self, token: str) -> bool:
        current = self.read()
        if current is None or current[1] != token:
            return False
        self.fs.rm_file(self.path)
        return True


def _backend(uri: str, storage: StorageConfig):
    if uri.startswith(("s3://", "s3a://")):
        return _S3Backend(uri, storage)
    fs, path = filesystem(uri, storage)
    if is_local(fs):
        return _LocalBackend(path)
    log.warning("ugcsr: %s has no conditional writes; the DST lease is best effort there", uri)
    return _FsspecBackend(uri, storage)


class DstLease:
    """`with DstLease(dst, storage):` holds the lease for the block (acquire, renew, release)."""

    def __init__(self, dst: str, storage: StorageConfig | None = None, *, ttl_s: float = 120.0,
                 owner: str | None = None):
        self.uri = join(dst, *LEASE_KEY.split("/"))
        self.dst = dst
        self.storage = storage or StorageConfig()
        self.ttl_s = ttl_s
        self.owner = owner or default_owner()
        self.run_id = uuid.uuid4().hex[:12]
        self.backend = _backend(self.uri, self.storage)
        self.token: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, acquired_at: float | None = None) -> tuple[LeaseRecord, bytes]:
        now = time.time()
        rec = LeaseRecord(self.owner, self.run_id, acquired_at or now, now + self.ttl_s, process_space(), os.getpid())
        return rec, json.dumps(asdict(rec), indent=2).encode()

    def acquire(self) -> LeaseRecord:
        rec, data = self._record()
        token = self.backend.put(data, None)
        if token is None:
            current = self.backend.read()
            if current is not None:
                held = _parse(current[0])
                if held is not None and held.expires_at > time.time() and not held.dead_here():
                    raise LeaseHeld(
                        f"DST {self.dst} is being written by another run: {held.describe()}. Two runs must not write "
                        "one DST at once: wait for it to end, or stop it (`ugcsr jobs stop ID` for a Ray job). If that "
                        f"run died, its lease expires by itself; {self.uri} shows it.")
                # Expired, or its owner died on this machine, or unreadable: take it over, conditionally.
                log.warning("ugcsr: taking over the stale DST lease of %s", held.describe() if held else "an unknown run")
                token = self.backend.put(data, current[1])
            else:  # released between our two calls
                token = self.backend.put(data, None)
            if token is None:
                raise LeaseHeld(f"DST {self.dst}: another run took the lease at the same moment; see {self.uri}")
        self.token, self.acquired = token, rec
        self._thread = threading.Thread(target=self._renew_loop, name="ugcsr-dst-lease", daemon=True)
        self._thread.start()
        return rec

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 5):
            try:
                self.renew()
            except Exception as err:  # noqa: BLE001 - a transient store error: try again next round
                log.warning("ugcsr: renewing the DST lease failed (%s); retrying", err)
            if self.lost:
                return

    def renew(self) -> None:
        _, data = self._record(self.acquired.acquired_at)
        token = self.backend.put(data, self.token)
        if token is None:
            self.lost = True
            log.error("ugcsr: the DST lease on %s was taken by another run; this run's writes may now race "
                      "with it", self.dst)
        else:
            self.token = token

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.token is not None and not self.lost:
            try:
                self.backend.delete(self.token)
            except Exception as err:  # noqa: BLE001 - the lease then simply expires
                log.warning("ugcsr: could not release the DST lease (%s); it expires in %.0f s", err, self.ttl_s)
        self.token = None

    def __enter__(self) -> "DstLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(data: bytes) -> LeaseRecord | None:
    try:
        return LeaseRecord(**json.loads(data))
    except (ValueError, TypeError):
        return None
