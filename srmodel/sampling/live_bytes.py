"""Peak bytes of the tensors an operation creates, counted at torch's dispatcher (CPU, CUDA or `meta`).

`LiveBytes` is a TorchDispatchMode: every tensor an op returns that does not share storage with a
tensor it already knows is counted as new memory (its storage's size) until the last tensor holding
that storage is garbage-collected. Its `peak` is then the high-water mark of the memory a forward
allocated: what a caching allocator's `max_memory_allocated` reports, less fragmentation. On `meta`
tensors it costs no memory and no compute, so the real model's activations can be counted at any
tile size and batch (`fused_attention()` stands in for the fused GPU kernels of attention, whose
only memory is their output).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}  # storage id -> [bytes, live tensors]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def _track(self, t: torch.Tensor, known: set[int]) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in known and key not in self._refs:  # a view of an input the mode did not create
            return
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [storage.nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        known = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, known)
        return out


@contextlib.contextmanager
def fused_attention():
    """F.scaled_dot_product_attention as a fused kernel's memory: only its output (flash / memory-efficient
    attention on a GPU never holds the (queries x keys) matrix). For counting on `meta`; values are not computed."""
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real
