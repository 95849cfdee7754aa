"""End to end on one GPU: the bare SR actor loop vs the full Ray pipeline on 512x512 inputs, and GPU busy time.

    python bench/gpu_e2e.py [--images 128] [--steps 20] [--batch 16] [--dtype bf16]
    python bench/gpu_e2e.py --tiny --images 8 --steps 1      # CPU smoke run of this script

Real-size random weights: SD-2-base UNet, ControlNet, VAE and text encoder at
their released sizes (built once into --model-dir, ~3 GiB in fp16), with the
tiny SAM 2.1 and fixed-tag prompts as stand-ins (the semantic stage is ~1% of
the work). Side by side in one run:

  (a) bare SR loop: SRStage called on batches of --batch decoded images with
      their tokens precomputed (the GPU-bound core, no Ray, no IO);
  (b) bare full loop: read, decode, semantic, SR, encode (JPEG) in one process;
  (c) `run_upscale` on a local Ray (start-up included, and excluded from the
      first manifest part on);

each with the GPU busy fraction (nvidia-smi utilization, sampled every 100 ms).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from actors.decode import DecodeStage
from actors.read import ReadStage
from actors.semantic import SemanticStage
from actors.sr import SRStage
from actors.write import WriteStage
from cluster import ray_runtime
from pipelines.job import UpscaleJob
from pipelines.listing import list_inputs
from pipelines.upscale import run_upscale
from srmodel import ensure_tiny_model, get_preset
from srmodel.config import ModelSource

SD2_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024, norm_num_groups=32, use_linear_projection=True,
)
SD2_CONTROLNET = dict({k: v for k, v in SD2_UNET.items() if k not in ("sample_size", "out_channels", "up_block_types")},
                      conditioning_embedding_out_channels=[16, 32, 96, 256])


def build_real_size(folder: Path) -> ModelSource:
    """The tiny model's folder with UNet, ControlNet, VAE and text encoder replaced by real-size random ones."""
    if (folder / "COMPLETE").is_file():
        return _source(folder)
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from srmodel.controlnet import SemanticControlNet
    from srmodel.unet import SemanticUNet

    tiny = Path(ensure_tiny_model().sd_base).parent
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(tiny, folder)
    torch.manual_seed(0)
    sd = folder / "stable-diffusion-2-base"
    tok_vocab = json.loads((sd / "tokenizer" / "vocab.json").read_text())
    shutil.rmtree(sd / "text_encoder")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tok_vocab), hidden_size=1024, intermediate_size=4096,
                                 num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                                 projection_dim=1024, hidden_act="gelu")).half().save_pretrained(sd / "text_encoder")
    shutil.rmtree(sd / "vae")
    AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
                  sample_size=512, scaling_factor=0.18215).half().save_pretrained(sd / "vae")
    ckpt = folder / "checkpoint-tiny"
    shutil.rmtree(ckpt)
    unet = SemanticUNet(**SD2_UNET)
    controlnet = SemanticControlNet(**SD2_CONTROLNET)
    with torch.no_grad():  # zero convs would switch the ControlNet path off
        for p in controlnet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    unet.half().save_pretrained(ckpt / "unet")
    controlnet.half().save_pretrained(ckpt / "controlnet")
    del unet, controlnet
    (folder / "COMPLETE").write_text("real-size-random")
    return _source(folder)


def _source(folder: Path) -> ModelSource:
    from srmodel.tiny import tiny_source

    return tiny_source(folder).model_copy(update={"revision": "real-size-random"})


class GpuBusy:
    """Mean nvidia-smi utilization.gpu while active (None without nvidia-smi)."""

    def __init__(self):
        self.samples: list[float] = []
        self.proc = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    @property
    def fraction(self) -> str:
        return f"{np.mean(self.samples) / 100:.2f}" if self.samples else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "ugcsr-real-size-random"))
    ap.add_argument("--tiny", action="store_true", help="the tiny preset on CPU: a smoke run of this script")
    args = ap.parse_args()

    if args.tiny:
        model = get_preset("tiny")
        model = model.model_copy(update={"sampler": model.sampler.model_copy(update={"upscale": 1, "process_size": 32})})
    else:
        model = get_preset("wild", build_real_size(Path(args.model_dir)))
        model = model.model_copy(update={"dtype": args.dtype})
    model = model.model_copy(update={"sampler": model.sampler.model_copy(
        update={"steps": args.steps, "prompt_source": "fixed", "fixed_tags": "photo"})})
    work = Path(tempfile.mkdtemp(prefix="ugcsr-gpu-e2e-"))
    src = work / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(args.images):
        small = rng.integers(0, 256, (args.size // 8, args.size // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((args.size, args.size), Image.BICUBIC).save(src / f"{k:05d}.png")
    res = {"sr_batch": args.batch, "semantic_batch": args.batch, "io_batch": 2 * args.batch}

    def job(dst: str) -> UpscaleJob:
        return UpscaleJob.model_validate({"src": str(src), "dst": dst, "model": model.model_dump(mode="json"),
                                          "resources": res, "format": "jpeg", "manifest_rows_per_file": args.batch})

    j = job(str(work / "loop"))
    rows = list_inputs(j.src, j.dst, j.storage, j.format).to_pylist()
    read, decode, sem = ReadStage(), DecodeStage(), SemanticStage(j.model)
    sr, write = SRStage(j.model), WriteStage(j.dst, j.format, j.quality)
    batches = []
    for start in range(0, len(rows), args.batch):
        chunk = rows[start : start + args.batch]
        batches.append(sem(decode(read({k: [r[k] for r in chunk] for k in chunk[0]}))))
    sr(dict(batches[0]))  # warm-up (kernels, allocator) outside the clock
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    with GpuBusy() as busy_a:
        t = time.perf_counter()
        for b in batches:
            sr(dict(b))
        sync()
        sr_rate = args.images / (time.perf_counter() - t)
    with GpuBusy() as busy_b:
        t = time.perf_counter()
        for start in range(0, len(rows), args.batch):
            chunk = rows[start : start + args.batch]
            write(sr(sem(decode(read({k: [r[k] for r in chunk] for k in chunk[0]})))))
        sync()
        loop_rate = args.images / (time.perf_counter() - t)
    del sr, sem
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    ray_runtime.connect()
    arrivals: list[tuple[float, int]] = []
    with GpuBusy() as busy_c:
        t = time.perf_counter()
        summary = run_upscale(job(str(work / "ray")), on_progress=lambda d, e, n: arrivals.append((time.perf_counter(), d)))
        ray_rate = args.images / (time.perf_counter() - t)
    assert summary["by_status"] == {"ok": args.images}, summary["by_status"]
    first_t, first_n = arrivals[0]
    steady = (args.images - first_n) / (arrivals[-1][0] - first_t) if len(arrivals) > 1 else float("nan")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}, {'tiny' if args.tiny else 'real-size random'} model, {args.images} images {args.size}^2, "
          f"x{model.sampler.upscale}, {args.steps} steps, CFG {model.sampler.cfg}, batch {args.batch}, {model.dtype}")
    print(f"  (a) bare SR actor loop     : {sr_rate:8.3f} images/s   GPU busy {busy_a.fraction}")
    print(f"  (b) bare full loop         : {loop_rate:8.3f} images/s   GPU busy {busy_b.fraction}")
    print(f"  (c) Ray Data pipeline      : {ray_rate:8.3f} images/s   GPU busy {busy_c.fraction} (start-up included)")
    print(f"      start-up excluded      : {steady:8.3f} images/s after the first part at {first_t - t:.1f} s")
    print(f"  ratios: (c)/(a) {ray_rate / sr_rate:.2f}, steady (c)/(a) {steady / sr_rate:.2f}, (c)/(b) "
          f"{ray_rate / loop_rate:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
