"""Writing tagger weights in the released formats (for the tiny preset; never needed with real weights)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .model import RAMTagger


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_ram_checkpoint(model: RAMTagger, path: str | Path) -> None:
    """`{'model': state_dict}` under RAM's names, with the junk a real file holds (buffers, Tag2Text twins)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name, module in model.visual_encoder.named_modules():
        if hasattr(module, "relative_position_index"):
            sd[f"visual_encoder.{name}.relative_position_index"] = module.relative_position_index.clone()
        if getattr(module, "attn_mask", None) is not None:
            sd[f"visual_encoder.{name}.attn_mask"] = module.attn_mask.clone()
    for key, value in list(sd.items()):
        if key.startswith("tagging_head.encoder.layer."):  # the tied Tag2Text encoder layers
            sd["tag_encoder." + key[len("tagging_head."):]] = value.clone()
    sd["text_decoder.bert.embeddings.word_embeddings.weight"] = torch.zeros(8, 4)
    _atomic_save({"model": sd}, Path(path))


def save_dape(model: RAMTagger, path: str | Path, generator: torch.Generator, r: int = 8, scale: float = 0.02) -> None:
    """A flat LoRA dict for every place DAPE has one (random A and B), plus untrained Tag2Text LoRA (B = 0)."""
    lora = {}
    for name, module in model.named_modules():
        if name.endswith("attn.qkv"):
            c = module.in_features
            lora[f"{name}.lora_A"] = scale * torch.randn(2 * r, c, generator=generator)
            lora[f"{name}.lora_B"] = scale * torch.randn(2 * c, r, generator=generator)
        elif name.startswith("tagging_head.") and name.endswith((".self.query", ".self.key")):
            lora[f"{name}.lora_A"] = scale * torch.randn(r, module.in_features, generator=generator)
            lora[f"{name}.lora_B"] = scale * torch.randn(module.out_features, r, generator=generator)
            twin = "tag_encoder." + name[len("tagging_head."):]
            lora[f"{twin}.lora_A"] = scale * torch.randn(r, module.in_features, generator=generator)
            lora[f"{twin}.lora_B"] = torch.zeros(module.out_features, r)
    _atomic_save(lora, Path(path))
