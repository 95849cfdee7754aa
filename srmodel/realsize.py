"""A real-size random release: every part at its released size and on-disk format, random values.

`python -m srmodel.tiny DIR --size real` calls write_real_release. Each part is built with its
parameters on `meta` (no init cost), given empty storage in the target dtype, filled with a seeded
normal scaled per tensor, written (safetensors streamed tensor by tensor, no second copy in memory)
and freed before the next: peak memory is about the largest part (the UNet, 4.5 GB in fp32).
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from pathlib import Path

import torch
from torch import nn

from .models import release_configs as rc

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


def materialize(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give `meta` parameters empty CPU storage in `dtype` (tied parameters stay tied); float buffers to `dtype`."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)
    return model


@torch.no_grad()
def fill(model: nn.Module, seed: int) -> None:
    """Random values, seeded per tensor name (so a ControlNet's copy of the UNet encoder equals the UNet's).

    Matrices and kernels get N(0, 1/fan_in); norm gains 1 + N(0, 0.02²) and other vectors N(0, 0.02²), so
    activations stay finite through every layer and no zero-initialised layer switches a path off.
    """
    gains = {id(m.weight) for m in model.modules() if isinstance(m, NORMS) and m.weight is not None}
    gen = torch.Generator()
    for name, p in model.named_parameters():
        gen.manual_seed((seed << 32) + zlib.crc32(name.encode()))
        values = torch.randn(p.shape, generator=gen)
        if p.ndim >= 2:
            values.mul_(p[0].numel() ** -0.5)
        else:
            values.mul_(0.02).add_(1.0 if id(p) in gains else 0.0)
        p.copy_(values)


def write_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """The safetensors format, written one tensor at a time (safetensors' save_file copies all of it first)."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    names = sorted(state)
    for name in names:
        t = state[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            f.write(state[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _random_part(part: str, dtype: torch.dtype, seed: int) -> nn.Module:
    with rc.params_on_meta():
        model = rc.BUILDERS[part]()
    materialize(model, dtype)
    fill(model, seed)
    return model


def _save_model(model: nn.Module, config: dict, folder: Path, weights: str) -> None:
    _write_json(folder / "config.json", config)
    write_safetensors(model.state_dict(), folder / weights)


def _write_diffusers(part: str, config: dict, folder: Path, dtype: torch.dtype, seed: int) -> int:
    model = _random_part(part, dtype, seed)
    _save_model(model, config, folder, "diffusion_pytorch_model.safetensors")
    return rc.count_params(model)


def _write_text_encoder(folder: Path, dtype: torch.dtype) -> int:
    model = _random_part("text_encoder", dtype, seed=3)
    config = dict(rc.SD2_TEXT_ENCODER_CONFIG, torch_dtype=str(dtype).removeprefix("torch."))
    _save_model(model, config, folder, "model.safetensors")
    return rc.count_params(model)


def _write_sam2(path: Path, dtype: torch.dtype) -> int:
    """The whole SAM 2.1 model with sam2's own init, saved as the official file: {"model": state_dict}."""
    from .semantic.sam2_encoder import save_sam2_checkpoint

    torch.manual_seed(4)
    model = rc.build_sam2().to(dtype)
    save_sam2_checkpoint(model, path, extra_keys=False)
    return rc.count_params(model)


def _write_ram(folder: Path, dtype: torch.dtype) -> nn.Module:
    from .ram.export import save_ram_checkpoint
    from .ram.model import TAG_LIST, THRESHOLDS

    model = _random_part("ram", dtype, seed=5)
    save_ram_checkpoint(model, folder / "ram_swin_large_14m.pth")
    shutil.copy(TAG_LIST, folder / "ram_tag_list.txt")
    shutil.copy(THRESHOLDS, folder / "ram_tag_list_threshold.txt")
    return model


def _write_dape(model: nn.Module, path: Path) -> int:
    from .ram.export import save_dape

    save_dape(model, path, torch.Generator().manual_seed(6), tag2text=True)
    return sum(t.numel() for t in torch.load(path, map_location="cpu", weights_only=True).values())


def _write_sd2_extras(sd: Path) -> None:
    from .sampling.ddpm import SD2_SCHEDULER_CONFIG
    from .models.tokenizer_files import write_clip_tokenizer

    write_clip_tokenizer(sd / "tokenizer", rc.SD2_TOKENIZER_CONFIG)
    sched = dict(_class_name="PNDMScheduler", _diffusers_version="0.10.0.dev0", **SD2_SCHEDULER_CONFIG)
    _write_json(sd / "scheduler" / "scheduler_config.json", sched)


def write_real_release(folder: Path, dtype: str = "fp32", log=print) -> dict[str, int]:
    """Write every part into `folder` (the released layout) one at a time; log one line per part.

    Returns {part: parameter count}. `dtype` is the on-disk dtype of the weights ("fp32" as released, or
    "fp16"); DAPE.pth stays fp32 (7 MB).
    """
    from .config import DTYPES

    torch_dtype = DTYPES[dtype]
    sd, seesr = folder / "stable-diffusion-2-base", folder / "checkpoint-90000"
    steps = [
        ("unet", seesr / "unet", lambda p: _write_diffusers("unet", rc.RELEASE_UNET_CONFIG, p, torch_dtype, 1)),
        # The same seed as the UNet: the ControlNet's encoder starts as the UNet's, as ControlNetModel.from_unet.
        ("controlnet", seesr / "controlnet",
         lambda p: _write_diffusers("controlnet", rc.RELEASE_CONTROLNET_CONFIG, p, torch_dtype, 1)),
        ("vae", sd / "vae", lambda p: _write_diffusers("vae", rc.SD2_VAE_CONFIG, p, torch_dtype, 2)),
        ("text_encoder", sd / "text_encoder", lambda p: _write_text_encoder(p, torch_dtype)),
        ("sam2", folder / "sam2.1_hiera_tiny.pt", lambda p: _write_sam2(p, torch_dtype)),
    ]
    counts: dict[str, int | None] = {}

    def timed(name: str, path: Path, write):
        start = time.perf_counter()
        count = write(path)
        counts[name] = count
        shown = f"{count:>14,} params" if count is not None else " " * 21
        log(f"{name:<13} {shown} {_bytes(path):>16,} bytes {time.perf_counter() - start:7.1f} s")

    for name, path, write in steps:
        timed(name, path, write)
    timed("tokenizer", sd / "tokenizer", lambda p: _write_sd2_extras(sd))  # and scheduler/
    tagger: dict[str, nn.Module] = {}

    def ram(path: Path) -> int:
        tagger["model"] = _write_ram(folder, torch_dtype)
        return rc.count_params(tagger["model"])

    timed("ram", folder / "ram_swin_large_14m.pth", ram)
    timed("dape", folder / "DAPE.pth", lambda p: _write_dape(tagger.pop("model"), p))
    return {k: v for k, v in counts.items() if v is not None}
