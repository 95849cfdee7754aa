"""Strict loading of diffusers-format weight folders (config.json + weights).

Why not ModelMixin.from_pretrained: it warns instead of failing on unexpected
keys, and its messages do not tell a user which file is wrong. The released
folders must load unchanged and a wrong folder must fail loudly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import WeightsError, describe_key_problems

WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
INDEX_NAMES = (
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)


def read_config(folder: str | Path, allowed_classes: tuple[str, ...]) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"weights folder {folder} does not exist (expected a folder with config.json)")
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(f"{folder} has no config.json; point at the model folder itself (e.g. checkpoint-90000/unet)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path} is not valid JSON: {err}") from err
    name = config.get("_class_name")
    if name not in allowed_classes:
        raise WeightsError(
            f"{path} describes a {name!r}, expected one of {list(allowed_classes)}; "
            "is this the right subfolder (unet/ vs controlnet/)?"
        )
    return config


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        # weights_only: never unpickle arbitrary objects from a weight file.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise WeightsError(f"{path} could not be read as a weight file: {err}") from err
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return state


def read_state_dict(folder: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The folder's tensors, from safetensors or .bin, single file or sharded."""
    folder = Path(folder)
    for name in INDEX_NAMES:
        index = folder / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise WeightsError(f"{index} is not a valid shard index (needs a 'weight_map'): {err!r}") from err
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_load_one(folder / shard))
            return state, str(index)
    for name in WEIGHT_NAMES:
        path = folder / name
        if path.is_file():
            return _load_one(path), str(path)
    raise WeightsError(
        f"{folder} has no weight file; expected one of {', '.join(WEIGHT_NAMES)} "
        "(as written by diffusers save_pretrained)"
    )


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Raise WeightsError naming every missing, unexpected or mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(v.shape), expected[k]) for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]
    ]
    if missing or unexpected or mismatched:
        raise WeightsError(
            describe_key_problems(source, missing=missing, unexpected=unexpected, mismatched=mismatched, hint=hint)
        )


def load_strict(
    build,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    hint: str = "",
) -> torch.nn.Module:
    """Build the model without allocating random weights, then assign the file's tensors."""
    with torch.device("meta"):
        model = build()
    check_state_dict(model, state, source, hint)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:  # a non-persistent buffer the file cannot hold: rebuild it for real
        real = build()
        real.load_state_dict(state, strict=True)
        model = real
    if device is not None:
        model = model.to(device)
    return model.eval()
