"""Ray Jobs API: submitting `ugcsr` programs to a cluster, attaching to them, following them.

- The submission id is derived from the program, its parsed settings (option order does not matter;
  a --config file counts by content) and the storage endpoint: submitting the same job twice finds the
  first one and attaches to it instead of starting a second writer on the same DST. A finished job is
  resumed under the next id of the same family (`<id>-r2`, `-r3`, ...), since Ray never reuses an id.
- The runtime_env ships this package's four top-level modules (`py_modules`) and the storage
  environment (endpoint, region); never credentials: the cluster uses its own (docs/cluster.md).
- The entrypoint asks for no GPU and no CPU: it only plans and writes the manifest; actors do the work.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Forwarded to the job when set here: where the store is, never who we are.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
# Names and values that look like secrets: a runtime_env sits in plain text in the job table (`jobs list`).
SECRET_HINTS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "PWD", "PASS", "KEY", "CREDENTIAL", "PRIVATE", "AUTH",
                "SESSION", "COOKIE", "DSN", "DATABASE_URL", "CONNECTION_STRING", "SIGNATURE")
SECRET_VALUES = re.compile(
    r"(A[KS]IA[0-9A-Z]{16}"  # AWS access key ids
    r"|-----BEGIN [A-Z ]*PRIVATE KEY"
    r"|\beyJ[\w-]{8,}\.[\w-]{8,}\."  # a JWT
    r"|\b(gh[pousr]_|github_pat_|glpat-|xox[abprs]-|sk-|hf_)[\w-]{16,}"  # GitHub, GitLab, Slack, OpenAI, Hugging Face
    r"|[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*@)"  # user:password@ in a URL
)
PACKAGES = ("srmodel", "actors", "pipelines", "cluster")
METADATA_KEY = "ugcsr"
ID_PATTERN = re.compile(r"^(?P<base>ugcsr-[a-z-]+-[0-9a-f]{12})(-r(?P<n>\d+))?$")


def submission_base(program: str, params: dict, env: dict[str, str]) -> str:
    """ugcsr-<program>-<12 hex>: the same program, settings and store give the same id family."""
    canon = {k: _canon(v) for k, v in sorted(params.items())}
    ident = json.dumps({"program": program, "params": canon, "env": env}, sort_keys=True)
    return f"ugcsr-{program}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def _canon(value):
    if isinstance(value, Path):
        # A --config file counts by what it says, not where it lies on the submitting machine.
        return {"file_sha256": hashlib.sha256(value.read_bytes()).hexdigest()} if value.is_file() else str(value)
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    return value


def storage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}
    for key, value in env.items():
        check_not_secret(value, key)
    for key, value in (extra or {}).items():
        if any(h in key.upper() for h in SECRET_HINTS):
            raise ValueError(f"--env {key}: secrets are never sent in a job's runtime_env (they would sit in plain "
                             f"text in the job table); {HOW_TO_PASS_SECRETS}")
        check_not_secret(value, f"--env {key}")
        env[key] = value
    return env


HOW_TO_PASS_SECRETS = ("give the cluster its own credentials: an instance role or IRSA for storage, a Kubernetes "
                       "secret mounted as environment in the Ray pods for other services (docs/cluster.md)")


def check_not_secret(value: str, what: str) -> None:
    """ValueError (never echoing the value) when `value` looks like a credential."""
    if SECRET_VALUES.search(str(value)):
        raise ValueError(f"{what}: the value looks like a secret (an access key, token, private key or "
                         f"user:password@ in a URL) and would be recorded in the job table; {HOW_TO_PASS_SECRETS}")


def package_dirs() -> list[str]:
    root = Path(__file__).resolve().parents[1]
    return [str(root / name) for name in PACKAGES]


@dataclass
class Prepared:
    entrypoint: str
    runtime_env: dict
    workdir: str | None  # a temp folder to delete after submitting


def prepare(program: str, args: list[str], env: dict[str, str], submission_id: str, config: Path | None,
            ship_code: bool = True) -> Prepared:
    """Entrypoint and runtime_env; a --config file travels in the job's working_dir as job.yaml."""
    args = list(args)
    workdir = None
    runtime_env: dict = {"env_vars": {**env, "UGCSR_SUBMISSION_ID": submission_id, "PYTHONUNBUFFERED": "1"}}
    if config is not None:
        workdir = tempfile.mkdtemp(prefix="ugcsr-submit-")
        shutil.copy(config, os.path.join(workdir, "job.yaml"))
        args = _replace_option(args, "--config", "job.yaml")
        runtime_env["working_dir"] = workdir
    if ship_code:
        runtime_env["py_modules"] = package_dirs()
        runtime_env["excludes"] = ["__pycache__", "*.pyc"]
    entrypoint = " ".join(_quote(a) for a in ["python", "-m", "pipelines.cli", program, *args])
    return Prepared(entrypoint, runtime_env, workdir)


def _replace_option(args: list[str], name: str, value: str) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a == name and i + 1 < len(args):
            out += [name, value]
            skip = True
        elif a.startswith(name + "="):
            out.append(f"{name}={value}")
        else:
            out.append(a)
    return out


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def client(address: str | None, connect_timeout_s: float = 120):
    """A JobSubmissionClient for `address` (else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS).

    Clusters with token authentication (Ray's default since 2.5x) need the cluster's token here: from
    $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. Ray's client only sends it in token mode,
    so that mode is switched on when a token is at hand and RAY_AUTH_MODE is not set (as `ray start` does).
    """
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no Ray cluster given: pass --address http://HEAD:8265 (the dashboard) or set RAY_ADDRESS")
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"  # before Ray reads its config (imported just below)
    import time

    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            return JobSubmissionClient(address)
        except ConnectionError as err:  # a head that is starting or busy answers late: retry for a while
            if time.monotonic() > deadline:
                raise ConnectionError(f"cannot reach the Ray Jobs API at {address} ({err}); is the cluster up and "
                                      "its dashboard port (8265) reachable, e.g. port-forwarded?") from err
            time.sleep(2)


def family(jobs, base: str) -> list:
    """Earlier submissions of the same job (same base id), oldest attempt first."""
    found = []
    for job in jobs:
        m = ID_PATTERN.match(job.submission_id or "")
        if m and m.group("base") == base:
            found.append((int(m.group("n") or 1), job))
    return [job for _, job in sorted(found, key=lambda t: t[0])]


def next_id(base: str, attempts: list) -> str:
    if not attempts:
        return base
    last = ID_PATTERN.match(attempts[-1].submission_id)
    return f"{base}-r{int(last.group('n') or 1) + 1}"


def submit_or_attach(cl, base: str, prepared: Prepared, metadata: dict) -> tuple[str, bool]:
    """(submission id, attached?): a running job of the same family is attached to, never duplicated."""
    import time

    deadline = time.monotonic() + 120
    while True:
        attempts = family(cl.list_jobs(), base)
        running = [j for j in attempts if not j.status.is_terminal()]
        if running:
            return running[-1].submission_id, True
        sid = next_id(base, attempts)
        try:
            cl.submit_job(entrypoint=prepared.entrypoint, submission_id=sid, runtime_env=prepared.runtime_env,
                          metadata=metadata, entrypoint_num_gpus=0, entrypoint_num_cpus=0)
            return sid, False
        except RuntimeError as err:
            if "No available agent" in str(err) and time.monotonic() < deadline:
                time.sleep(2)  # a head that has just started: its job agent is not up yet
            elif "already exists" not in str(err) or time.monotonic() > deadline:
                raise
            # "already exists": another submitter won the race for this id; look again and attach to it.


def follow(cl, sid: str, out=None) -> str:
    """Print the job's log as it grows until it ends; returns its final status name."""
    out = out or sys.stdout

    async def tail():
        async for chunk in cl.tail_job_logs(sid):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as err:  # noqa: BLE001 - the stream dropped: poll the status instead
        print(f"(log stream interrupted: {err}; waiting for the job to end)", file=sys.stderr)
    import time

    from ray.job_submission import JobStatus

    while True:
        status = cl.get_job_status(sid)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status.value
        time.sleep(2)
