"""`ugcsr train`: the recipe's split and loss, DDP gradients, overfit, resume, worker loss, export, S3.

Real local Ray (Train V2, 2 gloo workers where it matters) on a trainset built once per module
by `build-trainset` from tiny images (64 px crops), the tiny model.
"""

import json
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.support.inputs import rng_image
from pipelines.build_trainset import TrainsetJob, run_build_trainset
from pipelines.train.driver import run_train
from pipelines.train.job import TrainJob
from srmodel.presets import get_preset

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trainset(ray_local, tmp_path_factory):
    """16 pairs in two hash shards: the second is held out for the validation pictures."""
    root = tmp_path_factory.mktemp("trainset")
    hr = root / "hr"
    hr.mkdir()
    for k in range(16):
        rng_image(96, 80, k).save(hr / f"{k:03d}.png")
    job = TrainsetJob.model_validate({"src": str(hr), "dst": str(root / "ts"), "crop": 64, "min_pixels": 1,
                                      "min_file_bytes": 0, "shards": 2})
    assert run_build_trainset(job)["processed"]["ok"] == 16
    return root / "ts"


def train_job(trainset, run, **kw) -> TrainJob:
    recipe = {"batch_size": 1, "grad_accum": 1, "lr": 2e-3, **kw.pop("recipe", {})}
    data = {"trainset": str(trainset), "run": str(run), "model": get_preset("tiny").model_dump(mode="json"),
            "recipe": recipe, "max_steps": 4, "checkpoint_every": 2, "val_images": 1, "decode_actors": 1,
            "decode_cpus": 0.25, "decode_batch": 4, **kw}
    return TrainJob.model_validate(data)


def metrics(run) -> list[dict]:
    return pq.read_table(Path(run) / "metrics.parquet").to_pylist()


def decoded_rows(trainset, tiny_model, rows):
    from actors.train_data import TrainDecode

    table = pq.read_table(Path(trainset) / "shard-000000.parquet").to_pydict()
    out = TrainDecode(str(Path(tiny_model.sd_base) / "tokenizer"))(table)
    return {k: v[rows] for k, v in out.items()}


# ------------------------------------------------------------------------------------------- no Ray


def test_trainable_split_is_controlnet_and_image_attentions(tiny_model, tmp_path):
    from srmodel.train import TrainRecipe, load_train_parts
    from srmodel.models.unet import SemanticUNet
    from srmodel.tiny import UNET_CONFIG
    from diffusers import UNet2DConditionModel

    config = get_preset("tiny").model_copy(update={"source": tiny_model})
    parts = load_train_parts(config, TrainRecipe())
    model = parts.model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"controlnet.{n}" for n, _ in model.controlnet.named_parameters()}
    expected |= {f"unet.{n}" for n, _ in model.unet.named_parameters() if ".image_attentions." in n}
    assert trainable == expected and any(n.startswith("unet.") for n in trainable)
    assert all(not p.requires_grad for m in (parts.vae, parts.text.text_encoder, parts.encoder) for p in m.parameters())
    # frozen UNet layers in inference mode, the trained ones in training mode
    assert not model.unet.training and model.controlnet.training
    assert all(m.training for n, m in model.unet.named_modules() if ".image_attentions." in f".{n}.")
    assert model.unet.image_token_dim == 512  # unfolded

    # init=paper: where the authors started (their run.sh): SD-2-base UNet weights + the image_attentions of
    # the public SeeSR checkpoint, and SeeSR's whole ControlNet; not the release (checkpoint-90000) itself.
    from srmodel.models.controlnet import SemanticControlNet

    import shutil

    shutil.copytree(tiny_model.sd_base, tmp_path / "sd")
    base = UNet2DConditionModel(**UNET_CONFIG)
    base.save_pretrained(tmp_path / "sd" / "unet")
    seesr = tmp_path / "seesr"  # stands in for preset/models/seesr: the released shapes, other weights
    torch.manual_seed(1)
    for sub, cls in (("unet", SemanticUNet), ("controlnet", SemanticControlNet)):
        m = cls.from_pretrained(tiny_model.seesr, subfolder=sub)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        m.save_pretrained(seesr / sub)
    with pytest.raises(ValueError, match="seesr-init"):
        TrainRecipe(init="paper")
    source = tiny_model.model_copy(update={"sd_base": str(tmp_path / "sd")})
    paper = load_train_parts(get_preset("tiny").model_copy(update={"source": source}),
                             TrainRecipe(init="paper", seesr_init=str(seesr))).model
    released = SemanticUNet.from_pretrained(tiny_model.seesr, subfolder="unet")
    public_unet = SemanticUNet.from_pretrained(seesr, subfolder="unet").state_dict()
    public_cn = SemanticControlNet.from_pretrained(seesr, subfolder="controlnet").state_dict()
    released_cn = SemanticControlNet.from_pretrained(tiny_model.seesr, subfolder="controlnet").state_dict()
    base_state, released_state = base.state_dict(), released.state_dict()
    for name, value in paper.unet.state_dict().items():
        reference = public_unet[name] if ".image_attentions." in name else base_state[name]
        assert torch.equal(value.float(), reference), name
    for name, value in paper.controlnet.state_dict().items():
        assert torch.equal(value, public_cn[name]), name
    attn = next(n for n in released_state if ".image_attentions." in n and n.endswith("weight"))
    assert not torch.equal(paper.unet.state_dict()[attn], released_state[attn]), "paper differs from released"
    assert any(not torch.equal(v, released_cn[n]) for n, v in paper.controlnet.state_dict().items())


# ------------------------------------------------------------------------------------------- Ray Train


def _grad_probe(config):
    """Ray Train worker: one micro-batch per rank through the real Trainer on the DDP model; rank 0 saves grads."""
    import ray.train
    import ray.train.torch

    from srmodel.config import ModelConfig
    from srmodel.train import TrainRecipe, Trainer, load_train_parts
    from srmodel.train.step import unwrap

    rank = ray.train.get_context().get_world_rank()
    recipe = TrainRecipe(**config["recipe"])
    parts = load_train_parts(ModelConfig.model_validate(config["model"]), recipe)
    model = ray.train.torch.prepare_model(parts.model, parallel_strategy_kwargs={"find_unused_parameters": False})
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    trainer = Trainer(parts, recipe, "cpu", model=model)
    batch = {k: torch.from_numpy(v[[rank]]) for k, v in config["batch"].items()}
    trainer.accumulate([batch], [0])
    if rank == 0:
        torch.save({n: p.grad.clone() for n, p in unwrap(model).named_parameters() if p.grad is not None}, config["out"])


def test_gradients_equal_one_worker_accum2_and_two_ddp_workers(ray_local, trainset, tiny_model, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from srmodel.train import TrainRecipe, Trainer, load_train_parts

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests folder
    config = get_preset("tiny").model_copy(update={"source": tiny_model})
    batch = decoded_rows(trainset, tiny_model, [0, 1])
    out = tmp_path / "ddp_grads.pt"
    TorchTrainer(_grad_probe, train_loop_config={"recipe": {"grad_accum": 1}, "model": config.model_dump(mode="json"),
                                                 "batch": batch, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="grads", storage_path=str(tmp_path / "ray"))).fit()
    ddp = torch.load(out, weights_only=True)

    recipe = TrainRecipe(grad_accum=2)
    parts = load_train_parts(config, recipe)
    trainer = Trainer(parts, recipe)
    trainer.accumulate([{k: torch.from_numpy(v[[i]]) for k, v in batch.items()} for i in (0, 1)], [0, 0])
    local = {n: p.grad for n, p in parts.model.named_parameters() if p.grad is not None}
    assert set(local) == set(ddp) and len(local) == len(trainer.params)
    flat_local = torch.cat([local[n].flatten() for n in sorted(local)])
    flat_ddp = torch.cat([ddp[n].flatten() for n in sorted(local)])
    rel = float((flat_local - flat_ddp).norm() / flat_local.norm())
    worst = max(float((local[n] - ddp[n]).abs().max()) for n in local)
    print(f"1 worker x accum 2 vs 2 DDP workers x accum 1: relative L2 difference of the gradient {rel:.2e}, "
          f"largest element difference {worst:.2e} (gradient scale {float(flat_local.abs().max()):.2e})")
    assert rel < 1e-5
    torch.testing.assert_close(flat_ddp, flat_local, rtol=1e-4, atol=1e-6 * float(flat_local.abs().max()))
    assert any(float(g.abs().max()) > 0 for g in local.values())


def test_overfit_resume_export(ray_local, trainset, tiny_model, tmp_path, monkeypatch):
    from srmodel.models.controlnet import SemanticControlNet
    from srmodel.models.unet import SemanticUNet

    # 16 pairs - 1 validation row = 15 training rows, batch 2: 7 batches an epoch, so the checkpoint at step 12
    # is 5 batches into epoch 1 and the resume below always passes over part of an epoch.
    kw = dict(shuffle=False, materialize=True, recipe={"batch_size": 2}, checkpoint_every=12)
    # MLflow into a local file store (mlflow-skinny has no server or SQL store): run "a" by the job's fields, run
    # "b" by $MLFLOW_TRACKING_URI. The driver passes MLFLOW_ALLOW_FILE_STORE on: Ray's workers never see this env.
    mlruns = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    # what Ray Train was given: a materialized run its decoded rows, a streaming one "train" and "resume"
    from ray.data.dataset import MaterializedDataset

    import pipelines.train.driver as driver

    given, make = [], driver.training_datasets
    monkeypatch.setattr(driver, "training_datasets", lambda *a: given.append(make(*a)) or given[-1])
    whole = run_train(train_job(trainset, tmp_path / "a", max_steps=24, mlflow_tracking_uri=str(mlruns),
                                mlflow_experiment="overfit", **kw), log=lambda _: None)
    assert whole["step"] == 24
    rows = metrics(tmp_path / "a")
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s"} <= set(rows[0])
    first, last = np.mean([r["loss"] for r in rows[:10]]), np.mean([r["loss"] for r in rows[-10:]])
    print(f"overfit: mean loss of the first 10 steps {first:.4f}, of the last 10 {last:.4f}")
    assert last < 0.9 * first
    # the held-out loss (fixed t and seeds) at each checkpoint, and only there
    held = {r["step"]: r["val_loss"] for r in rows if r["val_loss"] is not None}
    assert sorted(held) == [12, 24] and all(v > 0 for v in held.values())
    assert (tmp_path / "a" / "train" / "checkpoint-00000024" / "validation" / "00-sr.png").is_file()

    # resume: 12 steps, then the same command with 24 goes on from step 12, optimizer state included. The second
    # streams (not materialized): the resumed epoch is read on from its checkpoint, its first 10 rows not decoded again
    lines = []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{mlruns}")
    run_train(train_job(trainset, tmp_path / "b", max_steps=12, **kw), log=lines.append)
    assert any(line.startswith("MLflow run ") and "(new) in experiment 'ugcsr-train'" in line for line in lines), lines
    lines.clear()
    streamed = {**kw, "materialize": False}
    again = run_train(train_job(trainset, tmp_path / "b", max_steps=24, **streamed), log=lines.append)
    steps = [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step ")]
    assert steps[0] == 13 and steps[-1] == 24 and again["step"] == 24
    assert any(line.startswith("resumed from checkpoint-00000012 (epoch 1, 10 samples into it): reading it on from "
                               "there (") and line.endswith("its first 10 rows are not decoded again)")
               for line in lines), lines
    assert any(line.startswith("MLflow run ") and "(continued)" in line for line in lines), lines
    assert any("MLflow params keep the run's first values: max_steps 12 (now 24)" in line for line in lines), lines
    assert not any("MLflow" in line and "failed" in line for line in lines), lines
    assert [r["step"] for r in metrics(tmp_path / "b")] == list(range(1, 25))
    assert [set(d) for d in given] == [{"train"}, {"train"}, {"train", "resume"}]
    assert all(isinstance(d["train"], MaterializedDataset) for d in given[:2])
    a = load_file(tmp_path / "a" / "train" / "checkpoint-00000024" / "trainable.safetensors")
    b = load_file(tmp_path / "b" / "train" / "checkpoint-00000024" / "trainable.safetensors")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resumed vs uninterrupted: largest weight difference {worst:.2e}")
    assert a.keys() == b.keys() and worst < 1e-5
    np.testing.assert_allclose([r["loss"] for r in metrics(tmp_path / "b")], [r["loss"] for r in rows], rtol=1e-4)
    assert {p.name for p in (tmp_path / "b" / "train").glob("checkpoint-*")} == {"checkpoint-00000012",
                                                                               "checkpoint-00000024"}
    # the same command once more: nothing to train, nothing overwritten, the export is there
    before = (tmp_path / "b" / "train" / "checkpoint-00000024" / "trainable.safetensors").stat().st_mtime_ns
    lines.clear()
    assert run_train(train_job(trainset, tmp_path / "b", max_steps=24, **kw), log=lines.append)["step"] == 24
    assert any("exporting only" in line for line in lines) and not any(line.startswith("step ") for line in lines)
    # this trainset was built without the tagger: said loudly, with the fix
    assert any(line.startswith("WARNING: every prompt") and "ram:" in line for line in lines)
    assert (tmp_path / "b" / "train" / "checkpoint-00000024" / "trainable.safetensors").stat().st_mtime_ns == before
    assert (tmp_path / "b" / "export" / "checkpoint-24" / "unet" / "config.json").is_file()

    # export: strict loads; frozen weights bitwise as they started, every trained tensor moved
    export = tmp_path / "a" / "export" / "checkpoint-24"
    unet = SemanticUNet.from_pretrained(export / "unet")
    controlnet = SemanticControlNet.from_pretrained(export / "controlnet")
    start_unet = SemanticUNet.from_pretrained(tiny_model.seesr, subfolder="unet").state_dict()
    start_cn = SemanticControlNet.from_pretrained(tiny_model.seesr, subfolder="controlnet").state_dict()
    for name, value in unet.state_dict().items():
        if ".image_attentions." in name:
            assert not torch.equal(value, start_unet[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(value, start_unet[name]), f"frozen {name} changed"
    assert all(not torch.equal(v, start_cn[n]) for n, v in controlnet.state_dict().items())
    # the export's configs carry every key the authors' classes write (their parity reference files); the only
    # others are what later diffusers versions added, at the values that build the same model in either version
    reference = Path(__file__).parents[1] / "data" / "reference" / "parity"
    newer = {"dropout": 0.0, "reverse_transformer_layers_per_block": None, "mid_block_type": "UNetMidBlock2DCrossAttn"}
    for sub in ("unet", "controlnet"):
        ours = json.loads((export / sub / "config.json").read_text())
        theirs = json.loads((reference / sub / "config.json").read_text())
        assert set(theirs) - set(ours) == set(), (sub, "missing", sorted(set(theirs) - set(ours)))
        extra = set(ours) - set(theirs)
        assert extra <= set(newer) and all(ours[k] == newer[k] for k in extra), (sub, {k: ours[k] for k in extra})
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000
    # TensorBoard: one event file per checkpoint (the resumed run "b" logs steps 13-24 once, after its resume)
    for run in ("a", "b"):
        events = _tensorboard(tmp_path / run / "tensorboard")
        steps = sorted(e.step for e in events if any(v.tag == "train/loss" for v in e.summary.value))
        assert steps == list(range(1, 25)), (run, steps)
        val = {e.step for e in events for v in e.summary.value if v.tag == "train/val_loss"}
        assert val == {12, 24}
        pictures = [v for e in events for v in e.summary.value if v.tag.startswith("validation/")]
        assert len(pictures) == 2 and all(p.image.width > 0 for p in pictures), run
    # MLflow: one MLflow run per RUN (the resumed "b" continued its own), every step once with metrics.parquet's
    # figures, val_loss at the checkpoints, the validation pictures, the params of the run's start
    for run, experiment in (("a", "overfit"), ("b", "ugcsr-train")):
        _check_mlflow_run(mlruns, experiment, tmp_path / run, list(range(1, 25)), [12, 24])
        params = _mlflow_run(mlruns, experiment, tmp_path / run).data.params
        assert params["recipe.batch_size"] == "2" and params["max_steps"] == {"a": "24", "b": "12"}[run], params
    assert (tmp_path / "a" / "train" / "checkpoint-00000012" / "validation" / "00-sr.png").is_file()
    assert (tmp_path / "a" / "validation" / "00-lr.png").is_file()


def _mlflow_run(mlruns, experiment: str, run):
    """The one MLflow run of RUN `run` in the file store `mlruns` (its id is the one in RUN/mlflow_run.json)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{mlruns}")
    (found,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                  filter_string=f"tags.`ugcsr.run` = '{run}'")
    assert found.info.run_id == json.loads((Path(run) / "mlflow_run.json").read_text())["run_id"]
    return found


def _check_mlflow_run(mlruns, experiment: str, run, steps: list[int], checkpoints: list[int], same=True) -> None:
    """Read back with the MLflow client: each step's figures exactly once, equal to metrics.parquet's; val_loss at the
    checkpoints; the pictures of each validation as artifacts, equal to the checkpoint's; the run FINISHED.
    same=False: steps only (steps redone after a restart keep the figures MLflow got first)."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    found = _mlflow_run(mlruns, experiment, run)
    client = MlflowClient(tracking_uri=f"file://{mlruns}")
    assert found.info.status == "FINISHED", found.info
    table = {r["step"]: r for r in metrics(run)}
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "val_loss"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, key))
        assert [s for s, _ in history] == (checkpoints if key == "val_loss" else steps), (run, key, history)
        if same:
            np.testing.assert_allclose([v for _, v in history], [table[s][key] for s, _ in history], rtol=1e-12)
    folders = [f"validation/checkpoint-{s:08d}" for s in checkpoints]
    assert [a.path for a in client.list_artifacts(found.info.run_id, "validation")] == folders
    for folder in folders:
        local = client.download_artifacts(found.info.run_id, f"{folder}/00-sr.png", str(Path(run) / "mlflow-download"))
        saved = Path(run) / "train" / folder.split("/")[1] / "validation" / "00-sr.png"
        assert not same or np.array_equal(np.asarray(Image.open(local)), np.asarray(Image.open(saved).convert("RGB")))


def _train_worker_pids(raylet_pid: int):
    """PIDs of this cluster's Ray Train workers (children of its raylet: never a stray worker of another Ray)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::") and "RayTrainWorker" in cmd and p.info["ppid"] == raylet_pid:
            found.append(p.info["pid"])
    return found


def test_validation_rows_are_held_out_of_training_not_a_whole_shard(ray_local, trainset, tiny_model, tmp_path):
    """Issue 20: a whole shard (half of this set) was kept out of training for 4 validation pictures."""
    from pipelines.train.data import dataset, held_out, list_shards, validation_rows

    job = train_job(trainset, tmp_path / "run", val_images=2)
    shards = list_shards(job.trainset, job.storage)
    train, held = held_out(job, shards)
    assert train == shards and held == [], "no shard is held out by default"
    val = validation_rows(job, held, train)
    ids = [r["unit_id"] for r in val]
    assert len(ids) == 2 and len(set(ids)) == 2
    rows = dataset(job, train, str(Path(tiny_model.sd_base) / "tokenizer"), exclude=ids).take_all()
    seen = [r["key"] for r in rows]
    assert len(rows) == 16 - 2, "every row trains but the two validated"
    from actors.train_data import sample_key

    assert not {sample_key(i) for i in ids} & set(seen)
    whole = train_job(trainset, tmp_path / "run", val_images=2, holdout_shards=1)
    train, held = held_out(whole, shards)
    assert held == shards[-1:] and validation_rows(whole, held, train)[0]["unit_id"] in \
        pq.read_table(shards[-1], columns=["unit_id"]).column("unit_id").to_pylist()


def _operator_stats(summary) -> dict:
    """Ray Data's per-operator stats of an executed dataset, its parents' (ListFiles) included."""
    found = {op.operator_name: op for op in summary.operators_stats}
    for parent in summary.parents:
        found.update(_operator_stats(parent))
    return found


def test_a_resumed_epoch_reads_on_without_decoding_the_rows_it_trained_on(ray_local, trainset, tiny_model, tmp_path,
                                                                          monkeypatch):
    """Issue 20: a mid-epoch resume decoded the epoch's first part again only to pass over it. The "resume" dataset
    Ray Train gets at each worker-group start leaves out the shards trained on and drops the first rows of the one
    it stopped in before decoding; a worker reads on from it only when its checkpoint is the one planned from."""
    from actors.train_data import sample_key
    from pipelines.train.data import list_shards, row_counts, stream_order, validation_rows
    from pipelines.train.resume import PLAN_FILE, RestOfEpoch, reads_on

    import ray.data

    tokenizer = str(Path(tiny_model.sd_base) / "tokenizer")
    # in order, as a run without shuffle executes (datasets copy the context they are made in)
    monkeypatch.setattr(ray.data.DataContext.get_current().execution_options, "preserve_order", True)
    for shuffle in (False, True):
        job = train_job(trainset, tmp_path / f"run-{shuffle}", shuffle=shuffle, recipe={"seed": 3})
        shards = list_shards(job.trainset, job.storage)
        exclude = [r["unit_id"] for r in validation_rows(job, [], shards)]
        counts = row_counts(shards, job.storage, job.trainset)
        counts[-1] -= len(exclude)
        paths, rows = stream_order(job, shards, counts)
        if shuffle:
            assert sorted(paths) == shards and stream_order(job, shards, counts) == (paths, rows)
        # an epoch's samples in stream order (the dataset's `key` is sample_key(unit_id))
        keys = [sample_key(u) for p in paths for u in pq.read_table(p).column("unit_id").to_pylist()
                if u not in exclude]
        assert len(keys) == sum(rows) == 15
        rest = RestOfEpoch(job, paths, rows, tokenizer, exclude)
        rest()  # no checkpoint yet: nothing planned
        assert json.loads((Path(job.run) / PLAN_FILE).read_text()) is None
        # in the first shard; with shuffle, in the second (the first not read at all)
        for done in ((rows[0] + 2,) if shuffle else (2,)):
            state = {"step": done, "epoch": 1, "samples_in_epoch": done, "world_size": 1, "batch_size": 1}
            folder = Path(job.run) / "train" / f"checkpoint-{done:08d}"
            folder.mkdir(parents=True)
            for name in ("trainable.safetensors", "optimizer.pt", "rng.pt", "metrics.parquet"):
                (folder / name).write_bytes(b"")
            (folder / "state.json").write_text(json.dumps(state))
            ds = rest()
            plan = json.loads((Path(job.run) / PLAN_FILE).read_text())
            assert plan["shards_left"] == (2 if done < rows[0] else 1), (done, plan)
            assert plan["rows_dropped"] == (done if done < rows[0] else done - rows[0])
            # what reaches the decode stage is the epoch's rest, exactly; the shards trained on are not even listed
            assert [r["key"] for r in ds.take_all()] == keys[done:], (shuffle, done)
            stats = _operator_stats(ds._get_stats_summary())
            (decode,) = [op for name, op in stats.items() if "TrainDecode" in name]
            assert decode.total_input_num_rows == len(keys) - done
            assert stats["ListFiles"].output_num_rows.sum == plan["shards_left"]
            assert reads_on(job, state, 1) == plan
            assert reads_on(job, {**state, "step": done - 1}, 1) is None, "another checkpoint: pass over"
            assert reads_on(job.model_copy(update={"materialize": True}), state, 1) is None
            # saved by another number of workers or batch size: its rest is not whole batches from there
            assert reads_on(job, state, 2) is None and reads_on(job, {**state, "batch_size": 2}, 1) is None
        assert not {sample_key(i) for i in exclude} & set(keys)
    # a newest checkpoint whose state.json was cut short (a group died copying it to a local RUN): planning must not
    # fail the worker-group start (Ray Train would end the run), the workers pass over instead
    folder = Path(job.run) / "train" / "checkpoint-00000099"
    folder.mkdir()
    for name in ("trainable.safetensors", "optimizer.pt", "rng.pt", "metrics.parquet"):
        (folder / name).write_bytes(b"")
    (folder / "state.json").write_text('{"step": 99, "epo')
    assert rest() is not None and json.loads((Path(job.run) / PLAN_FILE).read_text()) is None


def test_validation_prompts_come_from_the_tagger_on_the_lr_as_upscale_makes_them(trainset, tiny_model):
    """Issue 20: validation used the trainset's prompt (tagged on the GT); inference tags the LR image."""
    from actors.decode import decode_image
    from actors.semantic import SemanticStage
    from pipelines.train.worker import validation_prompts
    from srmodel.train import TrainRecipe, load_train_parts

    config = get_preset("tiny").model_copy(update={"source": tiny_model})
    assert config.sampler.prompt_source == "tagger"
    parts = load_train_parts(config, TrainRecipe())
    rows = pq.read_table(Path(trainset) / "shard-000001.parquet").slice(0, 3).to_pylist()
    prompts = validation_prompts(parts, rows)
    lr = [decode_image(r["lr_png"])[0] for r in rows]
    stage = SemanticStage(config.model_dump(mode="json"), device="cpu")
    images = np.empty(len(lr), dtype=object)
    for k, image in enumerate(lr):
        images[k] = image
    out = stage({"image_id": np.array(["a", "b", "c"]), "image": images})
    assert prompts == list(out["prompt"]) and all(prompts), (prompts, list(out["prompt"]))


def _tensorboard(folder) -> list:
    """Every event of the TFRecord files in `folder`, parsed with tensorboardX's own Event proto."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    files = sorted(Path(folder).glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    events = []
    for f in files:
        data, at = f.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at : at + 8])
            events.append(Event.FromString(data[at + 12 : at + 12 + n]))
            at += 12 + n + 4
    return events


def test_worker_killed_mid_run_continues_from_last_checkpoint(ray_local, trainset, tmp_path, monkeypatch):
    import time

    run = tmp_path / "run"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow too: the restarted group continues its run
    job = train_job(trainset, run, workers=2, max_steps=24, checkpoint_every=4, max_failures=2, materialize=True,
                    mlflow_tracking_uri=str(tmp_path / "mlruns"), mlflow_experiment="killed")
    killed, lines, result, saved = threading.Event(), [], {}, {}
    raylet_pid = ray_local.get(ray_local.remote(num_cpus=0)(lambda: int(os.environ["RAY_RAYLET_PID"])).remote())

    def log(line):
        lines.append(line)
        if line == "checkpoint checkpoint-00000004 saved":
            saved["at"] = time.monotonic()
        # Ray Train's controller registers a reported checkpoint when it next polls the workers (every 2 s); a kill
        # before that restarts from the previous registered one, here none (CI once killed 2 steps after the report,
        # 1.4 s, and the run started over). So the kill waits 3 s past the report; 24 steps leave over 10 s to come,
        # so it cannot land after the run has ended either (it did with 6 steps left, about 4 s, on a busy machine).
        if line.startswith("step ") and "at" in saved and time.monotonic() - saved["at"] > 3 and not killed.is_set():
            pids = _train_worker_pids(raylet_pid)
            result["pids"], result["killed_after"] = pids, line.split()[1]
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
            killed.set()

    thread = threading.Thread(target=lambda: result.update(run_train(job, log=log)))
    thread.start()
    assert killed.wait(400), f"no checkpoint came: {lines}"
    assert len(result["pids"]) == 2, result["pids"]
    thread.join(600)
    assert not thread.is_alive() and result["step"] == 24
    (resumed,) = [line for line in lines if line.startswith("resumed from checkpoint-000000")]
    assert "passing over its first" in resumed, resumed  # materialized: decoded once, passed over exactly
    assert [r["step"] for r in metrics(run)] == list(range(1, 25))
    assert sorted(p.name for p in (run / "train").glob("checkpoint-*")) == [
        f"checkpoint-{s:08d}" for s in range(4, 25, 4)]
    for s in range(4, 25, 4):
        state = json.loads((run / "train" / f"checkpoint-{s:08d}" / "state.json").read_text())
        assert state["step"] == s
    # the restarted worker group continued the MLflow run, and no step reached it twice
    assert any(line.startswith("MLflow run ") and "(continued)" in line for line in lines), lines
    _check_mlflow_run(tmp_path / "mlruns", "killed", run, list(range(1, 25)), list(range(4, 25, 4)), same=False)


def test_cli_run_on_s3_then_upscale_with_seesr(ray_local, trainset, s3, s3_endpoint, released_tiny, tmp_path):
    """TRAINSET, RUN and the weights on S3: workers, decoders and the export stage the weights themselves
    (nothing of the driver's disk is used), and the export upscales straight from S3 with --seesr."""
    import s3fs
    from typer.testing import CliRunner

    from pipelines.cli import app
    from srmodel.models.controlnet import SemanticControlNet
    from srmodel.models.unet import SemanticUNet
    from tests.support.cluster_helpers import upload_folder

    upload_folder(s3, trainset, "data", "trainset")
    upload_folder(s3, released_tiny, "weights", "tiny")
    s3.create_bucket(Bucket="runs")
    runner = CliRunner()
    res = runner.invoke(app, ["train", "s3://data/trainset", "s3://runs/tiny", "--preset", "tiny",
                              "--weights", "s3://weights/tiny", "--workers", "2", "--max-steps", "2",
                              "--batch-size", "1", "--checkpoint-every", "1", "--endpoint-url", s3_endpoint])
    assert res.exit_code == 0, res.output
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix="tiny/")["Contents"]}
    for key in ("tiny/metrics.parquet", "tiny/loss.png", "tiny/train/checkpoint-00000001/trainable.safetensors",
                "tiny/train/checkpoint-00000002/optimizer.pt", "tiny/export/checkpoint-2/unet/config.json",
                "tiny/export/checkpoint-2/controlnet/diffusion_pytorch_model.safetensors"):
        assert key in keys, sorted(keys)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    assert [r["step"] for r in pq.read_table("runs/tiny/metrics.parquet", filesystem=fs).to_pylist()] == [1, 2]
    local = tmp_path / "export"
    fs.get("runs/tiny/export/checkpoint-2/", str(local), recursive=True)
    SemanticUNet.from_pretrained(local / "unet")
    SemanticControlNet.from_pretrained(local / "controlnet")

    out = tmp_path / "sr"
    export = "s3://runs/tiny/export/checkpoint-2"
    res = runner.invoke(app, ["upscale", str(ROOT / "samples"), str(out), "--preset", "tiny", "--seesr", export,
                              "--endpoint-url", s3_endpoint])
    assert res.exit_code == 0, res.output
    rows = [r for f in (out / "_manifest").rglob("*.parquet") for r in pq.read_table(f).to_pylist()]
    assert sorted(r["status"] for r in rows) == ["ok"] * 3
    # the weights used are on record (and part of the params hash, so resume never mixes models)
    assert {r["model_id"] for r in rows} == {f"tiny:seesr:{export}"}


def test_bad_inputs_fail_with_clear_messages(tmp_path, tiny_cache):
    from typer.testing import CliRunner

    from pipelines.cli import app

    runner = CliRunner()

    def text(res):  # rich wraps long lines
        return " ".join(res.output.split())

    # The job cannot run: exit 3 (README "Exit codes"); bad settings: exit 2, naming the option.
    res = runner.invoke(app, ["train", str(tmp_path / "nothing"), str(tmp_path / "run"), "--max-steps", "2"])
    assert res.exit_code == 3 and "nothing" in text(res) and "build-trainset" in text(res)
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["train", str(tmp_path / "empty"), str(tmp_path / "run"), "--max-steps", "2"])
    assert res.exit_code == 3 and "no shard-*.parquet" in text(res)
    res = runner.invoke(app, ["train", str(tmp_path), str(tmp_path / "run"), "--max-steps", "2", "--lr", "0"])
    assert res.exit_code == 2 and "--lr" in text(res) and "given: 0" in text(res)
    res = runner.invoke(app, ["train", str(tmp_path), str(tmp_path / "run"), "--weights", str(tmp_path)])
    assert res.exit_code == 2 and "--preset wild" in text(res)
    res = runner.invoke(app, ["train", str(tmp_path), str(tmp_path / "run"), "--max-steps", "2", "--print-config"])
    assert res.exit_code == 0 and "max_steps: 2" in res.stdout and "name: tiny" in res.stdout
    res = runner.invoke(app, ["train", str(tmp_path), str(tmp_path / "run"), "--max-steps", "4",
                              "--checkpoint-every", "2", "--validate-every", "3"])
    assert res.exit_code == 2 and "multiple of checkpoint_every" in text(res)
    res = runner.invoke(app, ["upscale", str(ROOT / "samples"), str(tmp_path / "o"), "--seesr", str(tmp_path)])
    assert res.exit_code != 0 and "unet/config.json" in text(res)


def test_gpu_workers_on_autoscaling_clusters_and_no_silent_cpu_training(monkeypatch, tmp_path):
    """A GPU group that starts at 0 nodes still gets GPU workers (Ray Train waits, the autoscaler adds nodes);
    a full-size preset with no GPU anywhere is refused unless --allow-cpu."""
    from cluster import ray_runtime
    from cluster.ray_runtime import NodeShape
    from pipelines.train.driver import worker_gpus

    job = train_job(tmp_path / "ts", tmp_path / "run")
    real = job.model_copy(update={"model": job.model.model_copy(update={"name": "wild"})})
    monkeypatch.setattr(ray_runtime, "cluster_gpus", lambda: 0.0)
    monkeypatch.setattr(ray_runtime, "autoscaling_node_types",
                        lambda: [NodeShape(cpus=32, gpus=8, count=4, autoscaled=True)])
    lines = []
    assert worker_gpus(real, "wild", lines.append) == 1.0 and "autoscaler adds GPU nodes" in lines[0]
    monkeypatch.setattr(ray_runtime, "autoscaling_node_types", lambda: [NodeShape(cpus=32, gpus=0, count=4)])
    with pytest.raises(ValueError, match="--allow-cpu"):
        worker_gpus(real, "wild")
    assert worker_gpus(real.model_copy(update={"allow_cpu": True}), "wild") == 0.0
    assert worker_gpus(job, "tiny") == 0.0, "the tiny test model trains anywhere"
    monkeypatch.setattr(ray_runtime, "cluster_gpus", lambda: 8.0)
    assert worker_gpus(real, "wild") == 1.0
    assert worker_gpus(real.model_copy(update={"gpus_per_worker": 0.5}), "wild") == 0.5


def test_the_optimizer_is_decided_once_and_a_resume_keeps_it(monkeypatch, tmp_path):
    import types

    from pipelines.train.driver import _save_job, resolved_optimizer

    job = train_job(tmp_path / "ts", tmp_path / "run")
    assert job.recipe.optimizer == "auto"
    assert resolved_optimizer(job, 0.0) == "adamw", "CPU workers: torch AdamW"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    assert resolved_optimizer(job, 1.0) == "adamw"
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    assert resolved_optimizer(job, 1.0) == "adamw8bit", "GPU workers with the train-gpu extra: the authors' 8-bit AdamW"
    first = job.model_copy(update={"recipe": job.recipe.model_copy(update={"optimizer": "adamw8bit"})})
    _save_job(first)
    _save_job(first)  # the same run again: fine
    other = job.model_copy(update={"recipe": job.recipe.model_copy(update={"optimizer": "adamw"})})
    with pytest.raises(ValueError, match="trained with optimizer adamw8bit"):
        _save_job(other)
