"""Per-image Gaussian noise in the release's order: z_T first, then one full-latent draw per step.

Each image has its own stream, so its pixels never depend on which images share its batch. A
stream either draws from a CPU generator seeded per image (the same seed gives the same noise on
any accelerator) or hands out given tensors (`SRRequest.noise`: the authors' recorded draws, for
reproducing their outputs exactly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .seeds import generator_for


class NoiseStream:
    """The next N(0, I) tensor for one image; `given` tensors are used first, in order."""

    def __init__(self, seed: int | None = None, given: Sequence[torch.Tensor] | None = None,
                 generator: torch.Generator | None = None):
        if generator is None and seed is None and given is None:
            raise ValueError("a noise stream needs a seed, a generator or given noise")
        self.generator = generator if generator is not None else (generator_for(seed) if seed is not None else None)
        self._given = list(given) if given is not None else None
        self._used = 0

    def next(self, shape: Sequence[int]) -> torch.Tensor:
        """A float32 tensor of `shape` (a leading batch axis of 1 in given noise is accepted)."""
        shape = tuple(shape)
        if self._given is not None:
            if self._used >= len(self._given):
                raise ValueError(
                    f"given noise has {len(self._given)} tensors but draw {self._used + 1} was asked for; "
                    "pass z_T and one tensor per denoising step"
                )
            t = torch.as_tensor(self._given[self._used]).float()
            self._used += 1
            if tuple(t.shape) != shape and t.shape[1:] == torch.Size(shape) and t.shape[0] == 1:
                t = t[0]
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"given noise tensor {self._used - 1} has shape {tuple(t.shape)}, expected {shape} "
                    "(the latent grid of the working size)"
                )
            return t
        if self.generator is None:
            raise ValueError("this noise stream has no generator for draws beyond the given noise")
        return torch.randn(shape, generator=self.generator, dtype=torch.float32, device=self.generator.device)

    def draw_from_generator(self, shape: Sequence[int]) -> torch.Tensor:
        """A draw that is never taken from the given noise (the release drew it from a global RNG)."""
        if self.generator is None:
            raise ValueError("this draw needs a seeded generator; give the image a seed as well as noise")
        g = self.generator
        return torch.randn(tuple(shape), generator=g, dtype=torch.float32, device=g.device)
