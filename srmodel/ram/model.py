"""RAM (Swin-L) tagger with DAPE merged: images -> tags, as SeeSR builds its prompts."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from .head import TaggingHead
from .swin import SwinTransformer

DATA = Path(__file__).parent / "data"
TAG_LIST = DATA / "ram_tag_list.txt"
THRESHOLDS = DATA / "ram_tag_list_threshold.txt"
SHA256 = {
    "ram_tag_list.txt": "5d96d2f7225527480ad773aaac76b6e5c08a18adf6eae9ca7d2ab923d5e7bd8b",
    "ram_tag_list_chinese.txt": "c912657a0f30be7b2f5df6ccffa17e1d84561d0bea508528e38b6d0d711bcfbe",
    "ram_tag_list_threshold.txt": "b6f81d0de1bc7f9c251af512c413eae976c77dbfbadf700d4e3d90510f4c6447",
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class RAMConfig(BaseModel):
    """Architecture; the defaults are RAM Swin-L 384 (ram_swin_large_14m.pth)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    img_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    proj_dim: int = 512
    head_hidden: int = 768
    head_heads: int = 4
    head_intermediate: int = 3072
    head_layers: int = 2
    num_classes: int = 4585
    lora_r: int = 8


TINY_RAM_CONFIG = RAMConfig(
    img_size=96, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=3, proj_dim=24,
    head_hidden=32, head_heads=2, head_intermediate=64, head_layers=2, num_classes=7,
)


def read_tag_list(path: str | Path = TAG_LIST) -> list[str]:
    # splitlines, no strip: line k is class k, spaces inside tags are meaningful.
    return Path(path).read_text(encoding="utf-8").splitlines()


def read_thresholds(path: str | Path = THRESHOLDS) -> torch.Tensor:
    return torch.tensor([float(line.strip()) for line in Path(path).read_text().splitlines() if line.strip()])


def check_data_files() -> None:
    """The shipped vocabulary files are byte-identical to RAM's (class order = checkpoint index)."""
    for name, digest in SHA256.items():
        if hashlib.sha256((DATA / name).read_bytes()).hexdigest() != digest:
            raise RuntimeError(f"{DATA / name} differs from RAM's release (sha256); reinstall ugcsr")


def tags_from_probs(probs: torch.Tensor, thresholds: torch.Tensor, tag_list: Sequence[str]) -> list[str]:
    """Tags whose probability is strictly above their class threshold, in class order, joined by ", "."""
    selected = probs > thresholds.to(probs)
    return [", ".join(tag_list[i] for i in row.nonzero().flatten().tolist()) for row in selected]


class RAMTagger(nn.Module):
    def __init__(self, config: RAMConfig, tag_list: Sequence[str], thresholds: torch.Tensor, *, antialias: bool = False):
        super().__init__()
        if len(tag_list) != config.num_classes or thresholds.numel() != config.num_classes:
            raise ValueError(
                f"{len(tag_list)} tags and {thresholds.numel()} thresholds for a model of {config.num_classes} classes"
            )
        c = config
        self.config = c
        self.tag_list = list(tag_list)
        self.antialias = antialias  # SeeSR resized the tensor without antialias; RAM's own transform did
        self.visual_encoder = SwinTransformer(c.img_size, c.patch_size, c.embed_dim, c.depths, c.num_heads, c.window_size)
        width = self.visual_encoder.num_features
        self.image_proj = nn.Linear(width, c.proj_dim)
        self.label_embed = nn.Parameter(torch.zeros(c.num_classes, c.proj_dim))
        self.wordvec_proj = nn.Linear(c.proj_dim, c.head_hidden)
        self.tagging_head = TaggingHead(c.head_layers, c.head_hidden, c.proj_dim, c.head_heads, c.head_intermediate)
        self.fc = nn.Linear(c.head_hidden, 1)
        self.register_buffer("thresholds", thresholds.float().clone(), persistent=False)
        self.register_buffer("label_queries", torch.zeros(c.num_classes, c.head_hidden), persistent=False)

    @torch.no_grad()
    def refresh_label_queries(self) -> None:
        """The label queries do not depend on the image: computed once after loading."""
        self.label_queries = F.relu(self.wordvec_proj(self.label_embed))

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.visual_encoder(pixels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for preprocessed pixels (B, 3, S, S)."""
        memory = self.image_embeds(pixels)
        queries = self.label_queries.to(memory.dtype).expand(memory.shape[0], -1, -1)
        return self.fc(self.tagging_head(queries, memory)).squeeze(-1)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 (H, W, 3) images of any size -> squashed to S x S, ImageNet-normalised."""
        device = self.fc.weight.device
        size = self.config.img_size
        out = []
        for img in images:
            arr = np.asarray(img)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"the tagger takes (H, W, 3) uint8 RGB images, got {arr.dtype} {arr.shape}")
            x = torch.from_numpy(np.array(arr, order="C")).to(device).permute(2, 0, 1)[None].float() / 255
            out.append(F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=self.antialias))
        x = torch.cat(out)
        mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.fc.weight.dtype)

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:  # the srmodel Tagger interface
        if not len(images):
            return []
        return tags_from_probs(self.forward(self.preprocess(images)).float().sigmoid(), self.thresholds, self.tag_list)
