"""Prompt assembly as released and the pluggable tagger interface (no model imports: cheap for any stage)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# The tagger is pluggable: anything mapping RGB uint8 images to one tag string each.
Tagger = Callable[[Sequence[np.ndarray]], list[str]]


def build_prompt(tags: str, user_prompt: str = "", added_prompt: str = "", *, added_first: bool = False) -> str:
    """The released prompt string, spacing quirks included: f"{tags}, {prompt}," + added_prompt.

    e.g. tags "dog, grass", no user prompt, the wild added prompt ->
    "dog, grass, ,clean, high-resolution, 8k, ultra-detailed, ultra-realistic".
    """
    if added_first:  # an option, not the release: keeps the quality words inside CLIP's 77 tokens
        return f"{added_prompt}, {tags}, {user_prompt},"
    return f"{tags}, {user_prompt}," + added_prompt


class FixedTagger:
    """A tagger that gives every image the same tag string (no RAM weights needed)."""

    def __init__(self, tags: str = ""):
        self.tags = tags

    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        return [self.tags for _ in images]
