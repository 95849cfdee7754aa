"""RAM's tagging head: 2 BERT layers with cross-attention + FFN only (module names as in the checkpoint)."""

from __future__ import annotations

import torch
from torch import nn


class CrossSelf(nn.Module):
    def __init__(self, hidden: int, memory: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(memory, hidden)
        self.value = nn.Linear(memory, hidden)

    def forward(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        split = lambda t: t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(h)), split(self.key(m)), split(self.value(m))
        attn = (q @ k.transpose(-2, -1)) / (d // self.heads) ** 0.5
        return (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


class AddNorm(nn.Module):
    def __init__(self, inp: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(inp, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)  # noqa: N815 - checkpoint name

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class CrossAttention(nn.Module):
    def __init__(self, hidden, memory, heads):
        super().__init__()
        self.self = CrossSelf(hidden, memory, heads)
        self.output = AddNorm(hidden, hidden)

    def forward(self, h, m):
        return self.output(self.self(h, m), h)


class Intermediate(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.dense = nn.Linear(hidden, inter)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, hidden, memory, heads, inter):
        super().__init__()
        self.crossattention = CrossAttention(hidden, memory, heads)
        self.intermediate = Intermediate(hidden, inter)
        self.output = AddNorm(inter, hidden)

    def forward(self, h, m):
        a = self.crossattention(h, m)
        return self.output(self.intermediate(a), a)


class Encoder(nn.Module):
    def __init__(self, layers, hidden, memory, heads, inter):
        super().__init__()
        self.layer = nn.ModuleList(Layer(hidden, memory, heads, inter) for _ in range(layers))

    def forward(self, h, m):
        for layer in self.layer:
            h = layer(h, m)
        return h


class TaggingHead(nn.Module):
    """Label queries attend to the image embeddings; no self-attention, no embeddings (deleted in RAM)."""

    def __init__(self, layers: int, hidden: int, memory: int, heads: int, inter: int):
        super().__init__()
        self.encoder = Encoder(layers, hidden, memory, heads, inter)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.encoder(queries, memory)
