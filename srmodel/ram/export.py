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


# Tag2Text's BERT-base parts in the real RAM object (12 layers, hidden 768) and the width their cross-attention
# keys read: the tag encoder reads the 512-wide image projection, the text decoder 768 (RAM's med_config).
TAG2TEXT_LAYERS = 12
TAG2TEXT_HIDDEN = 768
TAG2TEXT_CROSS_WIDTH = {"tag_encoder.encoder": 512, "text_decoder.bert.encoder": 768}


def _tag2text_lora(r: int) -> dict[str, torch.Tensor]:
    """The untrained (B = 0, A = 0 here) LoRA pairs of every Tag2Text BERT layer, as a real DAPE.pth holds them."""
    h, lora = TAG2TEXT_HIDDEN, {}
    for prefix, cross in TAG2TEXT_CROSS_WIDTH.items():
        for i in range(TAG2TEXT_LAYERS):
            for attn, key_in in (("attention", h), ("crossattention", cross)):
                for proj, width in (("query", h), ("key", key_in)):
                    name = f"{prefix}.layer.{i}.{attn}.self.{proj}"
                    lora[f"{name}.lora_A"] = torch.zeros(r, width)
                    lora[f"{name}.lora_B"] = torch.zeros(h, r)
    return lora


def save_dape(
    model: RAMTagger, path: str | Path, generator: torch.Generator, r: int = 8, scale: float = 0.02,
    tag2text: bool = False,
) -> None:
    """A flat LoRA dict for every place DAPE has one (random A and B), plus untrained Tag2Text LoRA (B = 0).

    With `tag2text` every Tag2Text layer's pair is there too (248 tensors, ≈1.78 M at Swin-L size, as the
    released file: RAM_DAPE.md §2.2); without, only the twins of the tagging head's layers (the tiny preset).
    """
    lora = _tag2text_lora(r) if tag2text else {}
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
