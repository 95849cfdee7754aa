"""One writer per DST: a lease object at DST/_state/lease.json.

Taken at the start of a run, renewed in the background, released at the end. A second run on the same
DST while the lease is live fails with a message naming the owner. A lease whose owner died expires
after `ttl_s` (2 minutes; renewed every ttl/5) and may then be taken over; at once when the owner ran on
this machine (same host and PID namespace) and its process is gone, as when a killed driver is rerun.
Expiry is judged by the store's clock (the lease object's age: S3's Date minus its LastModified, a
file's mtime), never by the clocks of the machines involved.

The lease fences: a run that lost it (taken over, or not renewed for ttl minus a margin) must not write
again. Its writers (Ray tasks) call `check_lease` before each write and fail with `LeaseLost`; the
driver's `DstLease.check` says the same between batches.

How "only one wins" is guaranteed depends on the store:
- S3 (and S3-compatible stores that implement conditional writes): `PutObject` with `If-None-Match: *`
  to create, `If-Match: <ETag>` to renew or take over, `DeleteObject` with `If-Match` to release;
- local folders (and shared filesystems with working `flock`): every operation under an exclusive
  lock on DST/_state/.lease.lock;
- other fsspec stores: best effort (check, write, read back), said in the log.
"""

from __future__ import annotations

import email.utils
import fcntl
import functools
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

from .storage import StorageConfig, _broken_body, filesystem, is_local, join

log = logging.getLogger("ugcsr")
LEASE_KEY = "_state/lease.json"


class LeaseHeld(RuntimeError):
    """Another live run holds the DST lease."""


class LeaseLost(RuntimeError):
    """This run no longer holds the DST lease: it must not write there again."""


@dataclass(frozen=True)
class Stored:
    """The lease object as read: its bytes, its token (ETag or digest), its age in the store's clock."""

    data: bytes
    token: str
    age_s: float | None = None  # None: the store tells no time (best-effort stores)


def process_space() -> str:
    """This boot of this host and its PID namespace: a lease written from the same space can be checked by pid.

    The kernel's boot id, not the hostname alone: the initial PID namespace has the same inode on every
    host, and pods or VMs may share a hostname; a pid is only meaningful within one boot.
    """
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    if not boot:
        return ""  # no way to tell this machine apart: never take over by pid (wait for the ttl)
    return f"{socket.gethostname()}|{boot}|{ns}"


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
    ttl_s: float = 0.0  # the holder's; 0 in records of older versions (the reader's ttl is used)

    def dead_here(self) -> bool:
        """Its owner ran on this host, in this PID namespace, and that process is gone (a killed driver)."""
        here = process_space()
        return bool(self.pid) and bool(here) and self.space == here and not _alive(self.pid)

    def expired(self, stored: Stored, ttl_s: float) -> bool:
        """Past its ttl since it was last written, by the store's clock where the store tells it."""
        if stored.age_s is not None:
            return stored.age_s > (self.ttl_s or ttl_s)
        return min(self.expires_at, time.time() + (self.ttl_s or ttl_s)) < time.time()

    def describe(self) -> str:
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.expires_at))
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

    def _read(self) -> Stored | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                age = time.time() - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Stored(data, hashlib.sha256(data).hexdigest(), age)

    def read(self):
        with self._locked():
            return self._read()

    def put(self, data: bytes, token: str | None):
        """Write if the current token is `token` (None: if absent); the new token, or None if it lost."""
        with self._locked():
            current = self._read()
            if (current is None) != (token is None) or (current is not None and current.token != token):
                return None
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
            return hashlib.sha256(data).hexdigest()

    def delete(self, token: str) -> bool:
        with self._locked():
            current = self._read()
            if current is None or current.token != token:
                return False
            os.remove(self.path)
            return True


class _S3Backend:
    """Conditional writes through boto3 (s3fs does not expose If-Match / If-None-Match)."""

    def __init__(self, uri: str, storage: StorageConfig):
        import boto3

        from botocore.config import Config

        bucket_key = uri.split("://", 1)[1]
        self.bucket, self.key = bucket_key.split("/", 1)
        kwargs = storage.s3_options().get("client_kwargs", {})
        # Short timeouts and few attempts: a renewal must not hang past the lease's ttl.
        config = Config(connect_timeout=5, read_timeout=10, retries={"mode": "standard", "max_attempts": 3})
        self.client = boto3.client("s3", config=config, **kwargs)
        self.body_retries = storage.body_retries

    def _precondition(self, err) -> bool:
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404") or status in (404, 409, 412)

    def read(self):
        from botocore.exceptions import ClientError

        for attempt in range(1, self.body_retries + 1):
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
                data = obj["Body"].read()
                break
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            except Exception as err:  # a body cut mid-stream: botocore returned already, so ask again
                if attempt == self.body_retries or not _broken_body(err):
                    raise
        age = None
        date = obj.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if date and obj.get("LastModified"):  # both the store's clock (whole seconds)
            age = (email.utils.parsedate_to_datetime(date) - obj["LastModified"]).total_seconds()
        return Stored(data, obj["ETag"], age)

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
                if current is not None and current.token == token:
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
        return Stored(data, hashlib.sha256(data).hexdigest())

    def put(self, data: bytes, token: str | None):
        current = self.read()
        if (current is None) != (token is None) or (current is not None and current.token != token):
            return None
        self.fs.pipe_file(self.path, data)
        again = self.read()
        return again.token if again and again.data == data else None

    def delete(self, token: str) -> bool:
        current = self.read()
        if current is None or current.token != token:
            return False
        self.fs.rm_file(self.path)
        return True


def lease_uri(dst: str) -> str:
    return join(dst, *LEASE_KEY.split("/"))


@functools.lru_cache(maxsize=16)
def _cached_backend(uri: str, storage_json: str):
    return _backend(uri, StorageConfig.model_validate_json(storage_json))


def check_lease(dst: str, storage: StorageConfig | dict, lease_id: str, ttl_s: float) -> None:
    """Before a writer (a Ray task) writes into DST: raise LeaseLost unless the lease is still `lease_id`'s and
    fresh by the store's clock. One small read per write batch."""
    storage = StorageConfig.model_validate(storage)
    try:
        current = _cached_backend(lease_uri(dst), storage.model_dump_json()).read()
    except Exception as err:  # noqa: BLE001 - the store failed past its retries: so would the write (an error
        log.warning("ugcsr: cannot read the DST lease before writing (%s); writing anyway", err)  # row), and
        return  # the driver's own checks still end a run that lost its lease
    held = _parse(current.data) if current else None
    if held is None or held.run_id != lease_id:
        who = held.describe() if held else "nobody (the lease object is gone)"
        raise LeaseLost(f"DST {dst}: this run no longer holds the DST lease, {who} does; it stopped writing. "
                        "Run again to resume once the other run ended")
    if held.expired(current, ttl_s):
        raise LeaseLost(f"DST {dst}: this run's lease was not renewed for {current.age_s or 0:.0f} s (ttl "
                        f"{held.ttl_s or ttl_s:.0f} s; another run may take it over), so it stopped writing. Run "
                        "again to resume")


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
        self.uri = lease_uri(dst)
        self.dst = dst
        self.storage = storage or StorageConfig()
        self.ttl_s = ttl_s
        self.owner = owner or default_owner()
        self.run_id = uuid.uuid4().hex[:12]
        self.backend = _backend(self.uri, self.storage)
        self.token: str | None = None
        self.lost = False
        self.renewed_at = 0.0  # time.monotonic() of the last write that kept the lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, acquired_at: float | None = None) -> tuple[LeaseRecord, bytes]:
        now = time.time()
        rec = LeaseRecord(self.owner, self.run_id, acquired_at or now, now + self.ttl_s, process_space(), os.getpid(),
                          self.ttl_s)
        return rec, json.dumps(asdict(rec), indent=2).encode()

    def acquire(self) -> LeaseRecord:
        rec, data = self._record()
        token = self.backend.put(data, None)
        if token is None:
            current = self.backend.read()
            if current is not None:
                held = _parse(current.data)
                if held is not None and not held.expired(current, self.ttl_s) and not held.dead_here():
                    raise LeaseHeld(
                        f"DST {self.dst} is being written by another run: {held.describe()}. Two runs must not write "
                        "one DST at once: wait for it to end, or stop it (`ugcsr jobs stop ID` for a Ray job). If that "
                        f"run died, its lease expires by itself; {self.uri} shows it.")
                # Expired, or its owner died on this machine, or unreadable: take it over, conditionally.
                log.warning("ugcsr: taking over the stale DST lease of %s", held.describe() if held else "an unknown run")
                token = self.backend.put(data, current.token)
            else:  # released between our two calls
                token = self.backend.put(data, None)
            if token is None:
                raise LeaseHeld(f"DST {self.dst}: another run took the lease at the same moment; see {self.uri}")
        self.token, self.acquired, self.renewed_at = token, rec, time.monotonic()
        self._thread = threading.Thread(target=self._renew_loop, name="ugcsr-dst-lease", daemon=True)
        self._thread.start()
        return rec

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 5):
            try:
                self.renew()
            except Exception as err:  # noqa: BLE001 - a transient store error: try again next round
                log.warning("ugcsr: renewing the DST lease failed (%s); retrying", err)
            if self.stale() and not self.lost:
                self.lost = True
                log.error("ugcsr: the DST lease on %s was not renewed for %.0f s; this run stops writing", self.dst,
                          time.monotonic() - self.renewed_at)
            if self.lost:
                return

    def stale(self) -> bool:
        """No successful renewal for ttl minus a margin: another run may take the lease any moment now."""
        return time.monotonic() - self.renewed_at > 0.75 * self.ttl_s

    def renew(self) -> None:
        _, data = self._record(self.acquired.acquired_at)
        token = self.backend.put(data, self.token)
        if token is None:
            self.lost = True
            log.error("ugcsr: the DST lease on %s was taken by another run; this run stops writing", self.dst)
        else:
            self.token, self.renewed_at = token, time.monotonic()

    def check(self) -> None:
        """In the driver, between batches: raise LeaseLost once the lease is lost or stale."""
        if self.lost or self.stale():
            self.lost = True
            raise LeaseLost(f"DST {self.dst}: this run lost its DST lease ({self.uri}: taken over by another run, "
                            "or not renewed in time); it stopped writing. Run again to resume")

    @property
    def fence(self) -> dict:
        """What a writer task needs for `check_lease` (besides DST and the storage settings)."""
        return {"lease_id": self.run_id, "ttl_s": self.ttl_s}

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
