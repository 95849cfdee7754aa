"""MLflow tracking of a training run (optional: `pip install 'ugcsr[mlflow]'`), beside metrics.parquet and TensorBoard.

On only when a tracking URI is set: the TrainJob field `mlflow_tracking_uri`, else $MLFLOW_TRACKING_URI on the
driver (experiment: `mlflow_experiment`, else $MLFLOW_EXPERIMENT_NAME, else "ugcsr-train"); unset, mlflow is never
imported. The driver resolves it once (`resolve_tracking`, which refuses up front when mlflow is missing or cannot
use the URI) and hands it to the workers in the loop config: Ray workers do not inherit the driver's environment.

Rank 0 (`MlflowRun`) logs the run's params once, loss / lr / grad_norm / samples_per_s per step and val_loss per
checkpoint (the figures and steps of metrics.parquet and TensorBoard), and the validation pictures as artifacts
(validation/checkpoint-<step>/NN-sr.png). The MLflow run id is kept in RUN/mlflow_run.json: a resumed run (a new
command or a restarted worker group) continues the same MLflow run, and sends each metric only for the steps after
the last one that run already holds (asked once per start and after any failure), so no step is logged twice.
Best effort, like TensorBoard: a failing server is a logged line; what it missed is sent at the next checkpoint.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
from pathlib import Path

import typer

from cluster.storage import StorageConfig, filesystem, join, redact, write_bytes_atomic

from .job import TrainJob, checkpoint_name

ENV_URI, ENV_EXPERIMENT = "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "ugcsr-train"
INSTALL = "pip install 'ugcsr[mlflow]'"
RUN_FILE = "mlflow_run.json"
METRICS = ("loss", "lr", "grad_norm", "samples_per_s", "val_loss")  # metrics.parquet's columns, TensorBoard's scalars
# MLflow client settings the driver passes on to the workers. Never credentials (MLFLOW_TRACKING_TOKEN / _PASSWORD,
# DATABRICKS_TOKEN): the nodes get their own, as for object storage (docs/cluster.md).
FORWARDED_ENV = ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
# Rank 0 waits for the server at a checkpoint while the other ranks wait for it: mlflow's own defaults (7 retries,
# 120 s timeouts) could hold the run for 20 minutes per request when the server is down. Unless set otherwise:
WORKER_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
MAX_METRICS_PER_REQUEST = 1000  # MLflow's limit per log_batch
KEPT_VALIDATIONS = 3  # validation pictures kept for a server that is down (the newest checkpoints')
PARAM_CHARS = 500  # the shortest limit of an MLflow param value among the server versions in use


class MlflowUnavailable(typer.BadParameter):
    """A tracking URI is set but MLflow cannot log there: a usage error (the CLI exits 2, as for a bad option),
    raised before training starts. Not a ValueError: the CLI maps those to exit 3 (the job could not run)."""


def _local_store(uri: str) -> bool:
    """A file store (a path or file: URI) rather than a server or a named backend (databricks, uc)."""
    named = ("databricks", "databricks-uc", "uc")
    return uri.startswith("file:") or ("://" not in uri and ":" not in uri and uri not in named)


def resolve_tracking(job: TrainJob, environ=None) -> dict | None:
    """The driver's MLflow settings for the workers ({"tracking_uri", "experiment", "env"}), None when no tracking
    URI is set (then mlflow is not imported). Refuses (MlflowUnavailable) when mlflow cannot be imported or cannot
    use the URI; a file store given as a relative path is made absolute (workers run elsewhere)."""
    environ = os.environ if environ is None else environ
    uri = job.mlflow_tracking_uri or environ.get(ENV_URI) or None
    if not uri:
        return None
    where = "mlflow_tracking_uri" if job.mlflow_tracking_uri else f"${ENV_URI}"
    if _local_store(uri) and not uri.startswith("file:"):
        uri = os.path.abspath(os.path.expanduser(uri))
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise MlflowUnavailable(f"{where} is set ({redact(uri)}) but mlflow cannot be imported ({err}): install it "
                                f"with `{INSTALL}` (mlflow-skinny), or unset {where} to train without MLflow",
                                param_hint=f"'{where}'") from err
    try:
        MlflowClient(tracking_uri=uri)  # resolves the tracking store for the URI; no request to a server yet
    except Exception as err:  # noqa: BLE001 - whatever mlflow says about the URI is the message
        raise MlflowUnavailable(f"{redact(uri)}: mlflow cannot log there: {err}", param_hint=f"'{where}'") from err
    experiment = job.mlflow_experiment or environ.get(ENV_EXPERIMENT) or DEFAULT_EXPERIMENT
    return {"tracking_uri": uri, "experiment": experiment,
            "env": {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}}


def local_store_path(tracking: dict | None) -> str | None:
    """The file store's path when `tracking` logs to one (a local path each node must reach), else None."""
    return tracking["tracking_uri"] if tracking and _local_store(tracking["tracking_uri"]) else None


def run_params(job: TrainJob, gpus: float, train_rows: int) -> dict[str, str]:
    """The MLflow run's params: the recipe (recipe.*) and the job settings that shape the run."""
    r = job.recipe
    params = {"preset": job.model.name, "trainset": redact(job.trainset), "run": redact(job.run),
              "workers": job.workers, "gpus_per_worker": gpus,
              "effective_batch": job.workers * r.batch_size * r.grad_accum,
              "max_steps": job.max_steps, "checkpoint_every": job.checkpoint_every,
              "validate_every": job.validate_every or job.checkpoint_every, "val_images": job.val_images,
              "holdout_shards": job.holdout_shards, "train_rows": train_rows, "shuffle": job.shuffle,
              "materialize": job.materialize,
              **{f"recipe.{k}": v for k, v in r.model_dump(mode="json").items()}}
    return {k: str(v)[:PARAM_CHARS] for k, v in params.items()}


class MlflowRun:
    """Rank 0's MLflow run. `start` opens it (and logs the params), `checkpoint` sends what a checkpoint adds; both
    are best effort: a failure is a line said, never an exception, and is retried at the next checkpoint."""

    def __init__(self, config: dict, run: str, run_name: str, storage: StorageConfig):
        self.uri, self.experiment = config["tracking_uri"], config["experiment"]
        self.env, self.params = config.get("env") or {}, config.get("params") or {}
        self.run, self.run_name, self.storage = run, run_name, storage
        self.client = self.run_id = None
        self.held: dict[str, int] | None = None  # metric -> the last step the MLflow run holds (None: ask it)
        self.pending: dict[int, dict] = {}  # validation pictures not sent yet: step -> {name: HxWx3 uint8}

    def start(self, say) -> None:
        self._safely(say, "MLflow run could not be opened", lambda: None)

    def checkpoint(self, rows: list[dict], step: int, images: dict | None, final: bool, say) -> None:
        """Send the metric rows (METRICS_SCHEMA, every step so far) the MLflow run lacks, the validation pictures of
        this checkpoint (and of earlier ones a failure kept back); the run is marked FINISHED at the last step."""
        if images:
            self.pending[step] = dict(images)
            for old in sorted(self.pending)[:-KEPT_VALIDATIONS]:
                del self.pending[old]

        def send():
            self._send(rows)
            if final:
                self.client.set_terminated(self.run_id, "FINISHED")

        self._safely(say, f"MLflow logging at step {step} failed", send)

    def _safely(self, put, what: str, action) -> None:
        def say(line: str) -> None:  # the progress queue is best effort as well
            try:
                put(line)
            except Exception:  # noqa: BLE001, S110 - a line that cannot be shown is not worth a worker
                pass

        try:
            if self.run_id is None:
                self._open(say)
            if self.held is None:
                self.held = self._held()
            action()
        except ImportError as err:
            say(f"{what} (training goes on): mlflow cannot be imported on this worker ({err}); install it on every "
                f"node (`{INSTALL}`, the cluster image)")
        except Exception as err:  # noqa: BLE001 - best effort: never a lost checkpoint or a crashed worker
            self.held = None  # a request may have been half done: what the run holds is asked again next time
            say(f"{what} (training goes on, retried at the next checkpoint): {err!r}")

    def _open(self, say) -> None:
        os.environ.update(self.env)
        for k, v in WORKER_DEFAULTS.items():
            os.environ.setdefault(k, v)
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        record, run = self._record(), None
        if record.get("tracking_uri") == redact(self.uri) and record.get("run_id"):
            try:
                run = client.get_run(record["run_id"])
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            if run is None or run.info.lifecycle_stage == "deleted":
                say(f"MLflow run {record['run_id']} of {RUN_FILE} is gone from {redact(self.uri)}: starting a new one")
                run = None
        if run is None:
            name = posixpath.basename(self.run.rstrip("/")) or self.run_name
            run = client.create_run(self._experiment_id(client, MlflowException), run_name=name,
                                    tags={"ugcsr.run": redact(self.run), "ugcsr.ray_train_run": self.run_name})
            text = json.dumps({"tracking_uri": redact(self.uri), "experiment": self.experiment,
                               "experiment_id": run.info.experiment_id, "run_id": run.info.run_id}, indent=2)
            write_bytes_atomic(join(self.run, RUN_FILE), text.encode(), self.storage)
            how = "new"
        else:
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            how = "continued"
        self.client, self.run_id = client, run.info.run_id
        have = run.data.params
        new = {k: v for k, v in self.params.items() if k not in have}
        if new:
            client.log_batch(self.run_id, params=[Param(k, v) for k, v in new.items()])
        say(f"MLflow run {self.run_id} ({how}) in experiment {self.experiment!r} at {redact(self.uri)}")
        changed = [f"{k} {have[k]} (now {v})" for k, v in self.params.items() if k in have and have[k] != v]
        if changed:
            say(f"MLflow params keep the run's first values: {', '.join(changed)}")

    def _record(self) -> dict:
        """RUN/mlflow_run.json, {} when there is none."""
        fs, path = filesystem(join(self.run, RUN_FILE), self.storage)
        return json.loads(fs.cat_file(path)) if fs.exists(path) else {}

    def _experiment_id(self, client, MlflowException) -> str:
        found = client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return client.create_experiment(self.experiment)
            except MlflowException as err:  # another run created it meanwhile
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = client.get_experiment_by_name(self.experiment)
        if found.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {self.experiment!r} is deleted: restore it (`mlflow experiments "
                             "restore`) or set another mlflow_experiment")
        return found.experiment_id

    def _held(self) -> dict[str, int]:
        """Per metric, the last step the MLflow run holds (0: none)."""
        return {key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)
                for key in METRICS}

    def _send(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric
        from PIL import Image

        metrics = [Metric(key, float(r[key]), int((r.get("time") or time.time()) * 1000), int(r["step"]))
                   for r in rows for key in METRICS if r.get(key) is not None and r["step"] > self.held[key]]
        for at in range(0, len(metrics), MAX_METRICS_PER_REQUEST):  # in step order: `held` stays exact per request
            chunk = metrics[at:at + MAX_METRICS_PER_REQUEST]
            self.client.log_batch(self.run_id, metrics=chunk)
            for m in chunk:
                self.held[m.key] = max(self.held[m.key], m.step)
        for step in sorted(self.pending):
            with tempfile.TemporaryDirectory() as tmp:
                for name, image in self.pending[step].items():
                    Image.fromarray(image).save(Path(tmp) / f"{name}.png")
                self.client.log_artifacts(self.run_id, tmp, artifact_path=f"validation/{checkpoint_name(step)}")
            del self.pending[step]
