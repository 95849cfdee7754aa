"""`ugcsr train`'s MLflow logging (pipelines/train/mlflow_log.py) without Ray: the up-front refusal, the driver's
resolution of the tracking URI, and rank 0's MlflowRun against a local file store (exactly once per step across a
failing server and a restarted worker). The run through Ray Train is checked in test_train.py
(test_overfit_resume_export and test_worker_killed_mid_run_continues_from_last_checkpoint)."""

import json
import socket
import sys

import numpy as np
import pytest

from cluster.storage import StorageConfig
from pipelines.train.job import TrainJob
from srmodel.presets import get_preset

# What MlflowRun sets in the (worker) process environment: restored after each test here.
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_HTTP_REQUEST_TIMEOUT",
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_TRACKING_INSECURE_TLS")


@pytest.fixture(autouse=True)
def _clean_mlflow_env(monkeypatch):
    for name in MLFLOW_ENV:  # set first, so monkeypatch restores even a name that was absent
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def job(tmp_path, **kw) -> TrainJob:
    return TrainJob.model_validate({"trainset": str(tmp_path / "ts"), "run": str(tmp_path / "run"),
                                    "model": get_preset("tiny").model_dump(mode="json"), "max_steps": 8,
                                    "checkpoint_every": 2, **kw})


def text(res) -> str:  # rich wraps long lines
    return " ".join(res.output.split())


def test_train_refuses_up_front_when_mlflow_is_missing(tmp_path, monkeypatch):
    """A tracking URI set and no mlflow: exit 2 before anything starts, naming the extra to install."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.train.mlflow_log import MlflowUnavailable, resolve_tracking

    monkeypatch.setitem(sys.modules, "mlflow", None)  # not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    res = CliRunner().invoke(app, ["train", str(tmp_path / "ts"), str(tmp_path / "run"), "--max-steps", "2"])
    assert res.exit_code == 2, res.output
    assert "pip install 'ugcsr[mlflow]'" in text(res) and "$MLFLOW_TRACKING_URI" in text(res), text(res)
    assert not (tmp_path / "run").exists(), "nothing was started"
    # the same from a YAML field, named as such
    config = tmp_path / "train.yaml"
    config.write_text(f"mlflow_tracking_uri: {tmp_path / 'mlruns'}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    res = CliRunner().invoke(app, ["train", str(tmp_path / "ts"), str(tmp_path / "run"), "--max-steps", "2",
                                   "--config", str(config)])
    assert res.exit_code == 2 and "mlflow_tracking_uri is set" in text(res) and "ugcsr[mlflow]" in text(res), text(res)
    # no URI: no MLflow at all, and mlflow is not even imported
    assert resolve_tracking(job(tmp_path), environ={}) is None
    with pytest.raises(MlflowUnavailable):
        resolve_tracking(job(tmp_path), environ={"MLFLOW_TRACKING_URI": "http://mlflow.example:5000"})


def test_the_driver_resolves_the_tracking_uri_once_for_the_workers(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.train.mlflow_log import DEFAULT_EXPERIMENT, resolve_tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env.example:5000")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret")
    got = resolve_tracking(job(tmp_path))
    assert got == {"tracking_uri": "http://env.example:5000", "experiment": DEFAULT_EXPERIMENT,
                   "env": {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}}, "client settings travel, credentials never"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "env-experiment")
    assert resolve_tracking(job(tmp_path))["experiment"] == "env-experiment"
    # the job's fields win; a file store given as a relative path is made absolute (workers run elsewhere)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    got = resolve_tracking(job(tmp_path, mlflow_tracking_uri="mlruns", mlflow_experiment="mine"))
    assert got["tracking_uri"] == str(tmp_path / "mlruns") and got["experiment"] == "mine"
    assert got["env"]["MLFLOW_ALLOW_FILE_STORE"] == "true"
    # credentials in the URI are refused (the job is kept in train_job.json), without repeating them
    with pytest.raises(ValidationError, match="credentials"):
        job(tmp_path, mlflow_tracking_uri="https://user:hunter2@mlflow.example")
    config = tmp_path / "train.yaml"
    config.write_text("mlflow_tracking_uri: https://user:hunter2@mlflow.example\n")
    res = CliRunner().invoke(app, ["train", str(tmp_path / "ts"), str(tmp_path / "run"), "--max-steps", "2",
                                   "--config", str(config)])
    assert res.exit_code == 2 and "mlflow_tracking_uri" in text(res) and "credentials" in text(res), text(res)
    assert "hunter2" not in res.output
    # a URI mlflow cannot use: exit 2 with mlflow's own reason
    res = CliRunner().invoke(app, ["train", str(tmp_path / "ts"), str(tmp_path / "run"), "--max-steps", "2"],
                             env={"MLFLOW_TRACKING_URI": "bogus://nowhere"})
    assert res.exit_code == 2 and "bogus://nowhere" in text(res) and "mlflow cannot log there" in text(res), text(res)


def _rows(steps, t0=1.7e9) -> list[dict]:
    return [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "grad_norm": 0.5 + s, "samples_per_s": 3.0 + s, "epoch": 0,
             "time": t0 + s, "val_loss": 0.1 * s if s % 2 == 0 else None} for s in steps]


def _picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (16, 12, 3), dtype=np.uint8)


def test_mlflow_run_logs_every_step_once_across_a_failing_server_and_a_restart(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from pipelines.train.mlflow_log import METRICS, MlflowRun, run_params, resolve_tracking

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    j = job(tmp_path, mlflow_tracking_uri=f"file://{tmp_path / 'mlruns'}", mlflow_experiment="unit")
    config = {**resolve_tracking(j), "params": run_params(j, 0.0, 15)}
    lines = []
    first = MlflowRun(config, j.run, j.run_name, StorageConfig())
    first.start(lines.append)
    assert lines[-1].startswith("MLflow run ") and "(new) in experiment 'unit'" in lines[-1], lines
    first.checkpoint(_rows(range(1, 3)), 2, {"00-sr": _picture(2)}, False, lines.append)

    # the server fails half way through a request: a line, no exception, the pictures kept for later
    real = first.client.log_batch

    def half_done(run_id, metrics=(), **kw):
        real(run_id, metrics=list(metrics)[:3], **kw)
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(first.client, "log_batch", half_done)
    first.checkpoint(_rows(range(1, 5)), 4, {"00-sr": _picture(4)}, False, lines.append)
    assert "MLflow logging at step 4 failed" in lines[-1] and "went away" in lines[-1], lines
    monkeypatch.setattr(first.client, "log_batch", real)
    first.checkpoint(_rows(range(1, 7)), 6, None, False, lines.append)

    # a restarted worker (or the same command again) resumes from checkpoint 4 with another max_steps:
    # the same MLflow run, steps 5-6 not sent again
    config["params"] = run_params(j.model_copy(update={"max_steps": 10}), 0.0, 15)
    second = MlflowRun(config, j.run, j.run_name, StorageConfig())
    second.start(lines.append)
    assert f"MLflow run {first.run_id} (continued)" in lines[-2] and "max_steps 8 (now 10)" in lines[-1], lines
    second.checkpoint(_rows(range(1, 9)), 8, {"00-sr": _picture(8)}, True, lines.append)
    assert not [line for line in lines if "failed" in line and "step 4" not in line], lines

    client = MlflowClient(tracking_uri=config["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["ugcsr.run"] == j.run
    for key in METRICS:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        expected = [(r["step"], r[key]) for r in _rows(range(1, 9)) if r[key] is not None]
        assert [s for s, _ in history] == [s for s, _ in expected], (key, history)
        np.testing.assert_allclose([v for _, v in history], [v for _, v in expected])
    assert run.data.params["recipe.lr"] == str(j.recipe.lr) and run.data.params["max_steps"] == "8"
    assert run.data.params["train_rows"] == "15" and run.data.params["preset"] == "tiny"
    for step in (2, 4, 8):
        folder = client.download_artifacts(run.info.run_id, f"validation/checkpoint-{step:08d}", str(tmp_path / "dl"))
        assert np.array_equal(np.asarray(Image.open(f"{folder}/00-sr.png")), _picture(step))
    assert [a.path for a in client.list_artifacts(run.info.run_id, "validation")] == [
        f"validation/checkpoint-{s:08d}" for s in (2, 4, 8)]
    record = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())
    assert record["run_id"] == first.run_id and record["experiment"] == "unit"

    # the recorded run deleted from the server: a new one, said so
    client.delete_run(first.run_id)
    third = MlflowRun(config, j.run, j.run_name, StorageConfig())
    third.start(lines.append)
    assert "is gone" in lines[-2] and "(new)" in lines[-1] and third.run_id != first.run_id


def test_a_dead_tracking_server_is_a_line_never_an_exception(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from pipelines.train.mlflow_log import MlflowRun

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {"tracking_uri": f"http://127.0.0.1:{port}", "experiment": "x", "params": {"a": "1"},
              "env": {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}}
    lines = []
    dead = MlflowRun(config, str(tmp_path / "run"), "train", StorageConfig())
    dead.start(lines.append)
    dead.checkpoint(_rows(range(1, 3)), 2, {"00-sr": _picture(2)}, True, lines.append)
    assert len(lines) == 2 and "could not be opened" in lines[0] and "at step 2 failed" in lines[1], lines
    assert all("retried at the next checkpoint" in line for line in lines)

    def broken_queue(line):
        raise RuntimeError("the progress queue is gone")

    dead.checkpoint(_rows(range(1, 5)), 4, None, True, broken_queue)  # not even the line: still no exception
