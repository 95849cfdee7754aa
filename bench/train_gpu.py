"""Training throughput per GPU at the real model size (random weights), no Ray: samples/s/GPU.

    python bench/train_gpu.py [--size 512] [--dtype bf16] [--batches 1,2,4,8,16,32] [--steps 6] [--checkpointing]
    python bench/train_gpu.py --tiny      # the same code path on CPU with the tiny model (a smoke test)

SD-2-base UNet + ControlNet (with the 23 + 9 image_attentions blocks), SD VAE, a
CLIP ViT-H-sized text encoder and SAM 2.1 hiera-tiny, all at random init, trained
with the recipe's step (fp32 master weights, autocast, AdamW, clipping). Batch
sizes are tried in order until one does not fit. This is the per-GPU figure that a
DDP run on N GPUs multiplies by about N (one gradient all-reduce per optimizer step).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD2_UNET = dict(sample_size=64, in_channels=4, out_channels=4,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20, 20],
                cross_attention_dim=1024, use_linear_projection=True)
SD2_CONTROLNET = {k: v for k, v in SD2_UNET.items() if k not in ("sample_size", "out_channels", "up_block_types")}
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
              latent_channels=4, sample_size=512, scaling_factor=0.18215)


def real_size_parts(recipe, device):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from srmodel.models.controlnet import SemanticControlNet
    from srmodel.sampling.ddpm import make_scheduler
    from srmodel.presets import get_preset
    from srmodel.semantic.sam2_encoder import DEFAULT_CONFIG, SemanticEncoder
    from srmodel.models.text_encoder import TextConditioner
    from srmodel.tiny import ensure_tiny_model
    from srmodel.train.model import assemble_train_parts
    from srmodel.models.unet import SemanticUNet

    tokenizer = CLIPTokenizer.from_pretrained(Path(ensure_tiny_model().sd_base) / "tokenizer")  # ids only
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                        num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                                        hidden_act="gelu", projection_dim=1024))
    return assemble_train_parts(SemanticUNet(**SD2_UNET), SemanticControlNet(**SD2_CONTROLNET), AutoencoderKL(**SD_VAE),
                                TextConditioner(tokenizer, text), SemanticEncoder.from_config(DEFAULT_CONFIG),
                                make_scheduler(None), get_preset("wild"), recipe, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "no"])
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per batch size (after 2 warm-up)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (fits larger batches)")
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script, measures nothing useful")
    args = ap.parse_args()

    from srmodel.stages import resolve
    from srmodel.presets import get_preset
    from srmodel.train import TrainRecipe, Trainer, load_train_parts

    device = torch.device("cpu" if args.tiny else "cuda")
    recipe = TrainRecipe(mixed_precision=args.dtype, grad_accum=1, gradient_checkpointing=args.checkpointing,
                         optimizer="adamw")
    parts = load_train_parts(resolve(get_preset("tiny")), recipe) if args.tiny else real_size_parts(recipe, device)
    size = 64 if args.tiny else args.size
    trainable = sum(p.numel() for p in parts.model.parameters() if p.requires_grad) / 1e6
    total = sum(p.numel() for p in parts.model.parameters()) / 1e6
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {size}px, {args.dtype}, "
          f"checkpointing {args.checkpointing}; UNet+ControlNet {total:.0f}M parameters, {trainable:.0f}M trained")
    trainer = Trainer(parts, recipe, device)
    rng = np.random.default_rng(0)
    print(f"{'batch':>6} {'s/step':>8} {'samples/s/GPU':>14} {'peak GiB':>9}")
    for b in [int(x) for x in args.batches.split(",")]:
        batch = {"gt": torch.from_numpy(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)),
                 "lr_up": torch.from_numpy(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)),
                 "input_ids": torch.randint(0, 400, (b, 77)), "key": torch.arange(b)}
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for _ in range(2):
                trainer.accumulate([batch], [0])
                trainer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.accumulate([batch], [0])
                trainer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            trainer.optimizer.zero_grad(set_to_none=True)
            print(f"{b:>6} {'out of memory':>24}")
            break
        per_step = (time.perf_counter() - start) / args.steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        print(f"{b:>6} {per_step:>8.3f} {b / per_step:>14.2f} {peak:>9.1f}")


if __name__ == "__main__":
    main()
