"""A CLIP BPE tokenizer folder of the real size (49,408 ids), built offline with synthetic merges.

CLIP's vocabulary is laid out as: the 256 byte symbols (GPT-2's byte-to-unicode table), the same
with "</w>", one token per merge (48,894 merges), then <|startoftext|> (49406) and <|endoftext|>
(49407). The real merges cannot be downloaded here, so the merges are made up: every two- and
three-letter lowercase word piece first (so short prompt words are one token, as in CLIP), then
other symbol pairs until the vocabulary is full. Same file formats, same ids of the special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 49_408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END = "</w>"


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte, in CLIP's vocabulary order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def synthetic_merges(symbols: list[str], count: int) -> list[tuple[str, str]]:
    """`count` merges, each making a new token from two existing ones."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    seen = set(symbols) | {s + END for s in symbols}
    merges: list[tuple[str, str]] = []

    def add(left: str, right: str) -> None:
        if len(merges) < count and left + right not in seen:
            seen.add(left + right)
            merges.append((left, right))

    pieces = [a + b for a in letters for b in letters]
    for left, right in [(a, b) for a in letters for b in letters] + [(p, c) for p in pieces for c in letters]:
        add(left, right + END)
        add(left, right)
    for a in symbols:
        for b in symbols:
            add(a, b + END)
            add(a, b)
    if len(merges) < count:
        raise ValueError(f"only {len(merges)} merges could be made, {count} wanted")
    return merges


def write_clip_tokenizer(folder: Path, tokenizer_config: dict) -> None:
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, as SD-2's tokenizer/ has them."""
    symbols = byte_symbols()
    merges = synthetic_merges(symbols, VOCAB_SIZE - 2 * len(symbols) - 2)
    tokens = [*symbols, *(s + END for s in symbols), *(a + b for a, b in merges), BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special = {k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
