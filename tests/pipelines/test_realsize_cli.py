"""Every command at real model size on CPU: `upscale` (wild, synthetic; cascade, latent tiles, tiled VAE decode),
`build-trainset` -> `train` (2 optimizer steps) -> `upscale --seesr <export>` -> `evaluate`, and `upscale` with
the weights staged from S3 (moto).

Marked `realsize` (skipped unless UGCSR_REALSIZE=1 or `-m realsize`) and `slow`. The release is the one at
$UGCSR_REALSIZE_DIR when set (e.g. one `python -m srmodel.tiny DIR --size real --dtype fp16` wrote), else it is
written once per session into a tmp folder (~2.5 min, 4.6 GB). Each command runs as `python3 -m pipelines.cli`
in a subprocess (its embedded local Ray), as a user runs it; the peak RSS of its whole process tree (Ray workers
included) is sampled and printed. docs/realsize.md ("Real size on CPU") has the command and the times measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.realsize]

# One denoising step: the model's shapes and every code path are exercised; more steps only repeat the loop.
FAST = {"model": {"sampler": {"steps": 1}}}


@pytest.fixture(scope="session")
def realsize_weights(tmp_path_factory) -> Path:
    """The fp16 real-size release: $UGCSR_REALSIZE_DIR, or written once per session."""
    given = os.environ.get("UGCSR_REALSIZE_DIR")
    if given:
        folder = Path(given)
        assert (folder / "checkpoint-90000" / "unet" / "config.json").is_file(), f"{folder} is not a real-size release"
        return folder
    from srmodel.tiny import write_released_layout

    folder = tmp_path_factory.mktemp("realsize") / "fp16"
    write_released_layout(folder, size="real", dtype="fp16", log=print)
    return folder


class Peak:
    """Samples the summed RSS of a process and all its descendants (Ray's raylet and workers included)."""

    def __init__(self, pid: int, interval: float = 0.5):
        import psutil

        self.proc, self.interval, self.tree_bytes, self.one_bytes = psutil.Process(pid), interval, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                return
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            self.tree_bytes, self.one_bytes = max(self.tree_bytes, sum(rss)), max(self.one_bytes, max(rss, default=0))
            self.stop.wait(self.interval)

    def close(self):
        self.stop.set()
        self.thread.join()


def cli(*args: str, env: dict | None = None, timeout: float = 3600) -> dict:
    """`python3 -m pipelines.cli ARGS`; returns its stdout, wall time and peak RSS (tree and largest process)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = Peak(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        peak.close()
    wall = time.monotonic() - start
    print(f"\n$ ugcsr {' '.join(args[:1])}: {wall:.0f} s wall, peak RSS {peak.tree_bytes / 1e9:.1f} GB "
          f"(process tree), {peak.one_bytes / 1e9:.1f} GB (largest process)")
    assert proc.returncode == 0, f"ugcsr {' '.join(args)} exited {proc.returncode}\n{out[-4000:]}\n{err[-8000:]}"
    return {"stdout": out, "stderr": err, "wall_s": wall, "peak_tree": peak.tree_bytes, "peak_one": peak.one_bytes}


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def picture(w: int, h: int, seed: int) -> Image.Image:
    """Smooth colours plus a little noise (something a tagger and a degradation can work on)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((max(2, h // 16), max(2, w // 16), 3)) * 255).astype(np.uint8))
    img = np.asarray(coarse.resize((w, h), Image.BICUBIC)).astype(int) + rng.integers(-8, 9, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def check_run(dst: Path, expect: dict[str, tuple[int, int]]) -> list[dict]:
    """Every input ok, at its expected output size, finite (non-constant) pixels."""
    from pipelines.upscale.job import UpscaleJob
    from pipelines.upscale.manifest import read_manifest

    rows = read_manifest(str(dst), UpscaleJob.model_fields["storage"].default).to_pylist()
    by_name = {r["src_uri"].rsplit("/", 1)[-1]: r for r in rows}
    assert sorted(by_name) == sorted(expect), by_name.keys()
    for name, size in expect.items():
        row = by_name[name]
        assert row["status"] == "ok", (name, row.get("error_type"), row.get("error_message"))
        out = np.asarray(Image.open(row["dst_uri"].removeprefix("file://")).convert("RGB"))
        assert (out.shape[1], out.shape[0]) == size == (row["dst_width"], row["dst_height"]), name
        # uint8 is always finite: NaN/inf in the decoded latent shows as a constant image (NaN -> 0 after clamp).
        assert out.std() > 0, f"{name}: a constant output (NaN or inf in the model?)"
    return rows


# Inputs per preset (release path, process_size 512). wild x1 brings the short side to 512; synthetic x4 to 128,
# then x4. The latent is image / 8; it is tiled above 96 (TilingConfig.latent_tile), decoded in tiles above
# 224 + 22 = 246 (vae_decoder_tile, srmodel/models/vae.py decode_release).
INPUTS = {
    # 64x48 -> cascade to 682x512 -> model 680x512 (latent 85x64: one tile); 832x512: latent 104x64, two tiles.
    "wild": {"cascade.png": (64, 48), "tiles.png": (832, 512)},
    # 32x24 -> cascade 170x128 -> x4 680x512; 504x128 -> x4 2016x512: latent 252x64, four tiles and a tiled decode.
    "synthetic": {"cascade.png": (32, 24), "vae_tiles.png": (504, 128)},
}
SCALE = {"wild": 1, "synthetic": 4}


@pytest.mark.parametrize("preset", ["wild", "synthetic"])
def test_upscale_real_size_on_cpu(realsize_weights, tmp_path, preset):
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for k, (name, (w, h)) in enumerate(INPUTS[preset].items()):
        picture(w, h, k).save(src / name)
    config = write_yaml(tmp_path / "job.yaml", FAST)
    run = cli("upscale", str(src), str(dst), "--preset", preset, "--weights", str(realsize_weights), "--allow-cpu",
              "--dtype", "fp32", "--config", str(config), "--fail-on-error")
    s = SCALE[preset]
    rows = check_run(dst, {n: (w * s, h * s) for n, (w, h) in INPUTS[preset].items()})
    # The real-size RAM + DAPE tagger ran on each image (random weights: its tags may be empty, never missing).
    assert all(r["tags"] is not None for r in rows), rows
    assert json.loads(run["stdout"][run["stdout"].index("{"):])["by_status"] == {"ok": len(rows)}


def test_train_export_upscale_evaluate_real_size(realsize_weights, tmp_path):
    """build-trainset (256 crops) -> train 2 steps (batch 1, gradient checkpointing) -> upscale --seesr -> evaluate."""
    hr = tmp_path / "hr"
    hr.mkdir()
    for k in range(3):
        picture(256, 256, 10 + k).save(hr / f"{k}.png")
    trainset, run_dir = tmp_path / "ts", tmp_path / "run"
    small = write_yaml(tmp_path / "trainset.yaml", {"min_pixels": 1, "min_file_bytes": 0})  # the release skips < 384²
    cli("build-trainset", str(hr), str(trainset), "--crop", "256", "--shards", "1", "--preset", "realesrgan",
        "--config", str(small))
    assert list(trainset.glob("shard-*.parquet"))
    train_config = write_yaml(tmp_path / "train.yaml", {
        # All fp32 (the CPU default) the worker passed 15.9 GB at the first step and Ray's memory monitor killed it
        # here: 750 M trainable parameters are 12 GB with AdamW's fp32 states and grads, the frozen parts 5.4 GB.
        # bf16 autocast keeps the frozen parts (and frozen UNet layers) in bf16; trainable weights stay fp32.
        "recipe": {"gradient_checkpointing": True, "mixed_precision": "bf16"}, "val_images": 0, "decode_actors": 1, "decode_cpus": 0.25,
        "decode_batch": 1, "shuffle_buffer": 2})
    train = cli("train", str(trainset), str(run_dir), "--preset", "synthetic", "--weights", str(realsize_weights),
                "--config", str(train_config), "--batch-size", "1", "--grad-accum", "1", "--max-steps", "2",
                "--checkpoint-every", "2")
    print(f"train: {train['wall_s']:.0f} s, peak RSS {train['peak_tree'] / 1e9:.1f} GB")
    export = run_dir / "export" / "checkpoint-2"
    assert (export / "unet" / "config.json").is_file() and (export / "controlnet" / "config.json").is_file()
    import pyarrow.parquet as pq

    losses = pq.read_table(run_dir / "metrics.parquet").column("loss").to_pylist()
    assert len(losses) == 2 and all(np.isfinite(losses)), losses

    # The exported checkpoint in place of checkpoint-90000's unet/ and controlnet/; x4 of 64x64 is the GT's 256x256.
    lr, sr = tmp_path / "lr", tmp_path / "sr"
    lr.mkdir()
    for p in sorted(hr.glob("*.png"))[:2]:
        Image.open(p).resize((64, 64), Image.BICUBIC).save(lr / p.name)
    config = write_yaml(tmp_path / "job.yaml", FAST)
    cli("upscale", str(lr), str(sr), "--preset", "synthetic", "--weights", str(realsize_weights), "--seesr",
        str(export), "--allow-cpu", "--dtype", "fp32", "--config", str(config), "--fail-on-error")
    check_run(sr, {"0.png": (256, 256), "1.png": (256, 256)})

    cli("evaluate", str(sr), str(hr), "--no-lpips", "--no-nr", "--actors", "1")
    summary = json.loads((sr / "_eval" / "summary.json").read_text())
    text = json.dumps(summary)
    assert "psnr" in text.lower(), summary
    table = pq.read_table(sr / "_eval" / "metrics.parquet").to_pylist()
    ok = [r for r in table if r["status"] == "ok"]  # the third GT (trained on, not upscaled) is an Unpaired row
    assert sorted(r["image"] for r in ok) == ["0.png", "1.png"] and all(np.isfinite(r["psnr"]) for r in ok), table
    assert [r["error_type"] for r in table if r["status"] != "ok"] == ["Unpaired"], table


def upload_folder(s3, folder: Path, bucket: str, prefix: str) -> int:
    """Every file under `folder` to s3://bucket/prefix/ (boto3's multipart transfer); returns the bytes sent."""
    from boto3.s3.transfer import TransferConfig

    sent = 0
    transfer = TransferConfig(multipart_chunksize=64 * 2**20, max_concurrency=4)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}", Config=transfer)
        sent += path.stat().st_size
    return sent


def test_upscale_with_weights_staged_from_s3(realsize_weights, tmp_path, s3, s3_endpoint):
    """The whole release uploaded to a local S3, `--weights s3://...`: staged once on the node, then loaded."""
    s3.create_bucket(Bucket="weights")
    start = time.monotonic()
    sent = upload_folder(s3, realsize_weights, "weights", "release/v1")
    print(f"\nuploaded {sent / 1e9:.2f} GB in {time.monotonic() - start:.0f} s")
    src, dst, cache = tmp_path / "src", tmp_path / "out", tmp_path / "cache"
    src.mkdir()
    picture(64, 48, 0).save(src / "cascade.png")
    picture(48, 64, 1).save(src / "portrait.png")
    config = write_yaml(tmp_path / "job.yaml", FAST)
    cli("upscale", str(src), str(dst), "--preset", "wild", "--weights", "s3://weights/release/v1",
        "--endpoint-url", s3_endpoint, "--allow-cpu", "--dtype", "fp32", "--config", str(config), "--fail-on-error",
        env={"UGCSR_CACHE": str(cache)})
    check_run(dst, {"cascade.png": (64, 48), "portrait.png": (48, 64)})
    # One staged copy per released part (sd_base, seesr, SAM2, RAM, DAPE), each downloaded once, complete.
    slots = sorted(p for p in (cache / "staged").iterdir() if p.is_dir())
    assert len(slots) == 5, slots
    names = sorted(p.name for slot in slots for p in slot.iterdir() if not p.name.startswith("."))
    assert names == sorted(["stable-diffusion-2-base", "checkpoint-90000", "sam2.1_hiera_tiny.pt",
                            "ram_swin_large_14m.pth", "DAPE.pth"]), names
    for slot in slots:
        assert (slot / ".ugcsr-staged.json").is_file() and not list(slot.glob(".part-*")), slot
    staged = sum(p.stat().st_size for slot in slots for p in slot.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert staged == sent - sum(p.stat().st_size for p in realsize_weights.glob("ram_tag_list*.txt"))
