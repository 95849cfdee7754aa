"""Loading ram_swin_large_14m.pth and DAPE.pth unchanged: strict, with the LoRA merged once.

The authors loaded both with strict=False, which hides missing weights; here
every needed key must be present, the known junk of the real files is ignored
by name, and a LoRA B without its A is an error.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from pathlib import Path

import torch

from ..errors import WeightsError, describe_key_problems
from .model import TAG_LIST, THRESHOLDS, RAMConfig, RAMTagger, read_tag_list, read_thresholds

log = logging.getLogger(__name__)

# Keys of the real RAM checkpoint that the tagger does not use (recomputed buffers, Tag2Text parts).
IGNORED_RAM = (
    re.compile(r"\.relative_position_index$"),
    re.compile(r"\.attn_mask$"),
    re.compile(r"^tag_encoder\."),
    re.compile(r"^text_decoder\."),
    re.compile(r"^tagging_head\.embeddings\."),
    re.compile(r"^tagging_head\.encoder\.layer\.\d+\.attention\."),
)
# LoRA pairs in DAPE.pth that are merged; the tag_encoder twins share the head's weights (tie rule).
SWIN_LORA = re.compile(r"^visual_encoder\.layers\.\d+\.blocks\.\d+\.attn\.qkv$")
HEAD_LORA = re.compile(r"^tagging_head\.encoder\.layer\.(\d+)\.crossattention\.self\.(query|key)$")
TIED_LORA = re.compile(r"^tag_encoder\.encoder\.layer\.([01])\.crossattention\.self\.(query|key)$")
UNUSED_LORA = re.compile(r"^(tag_encoder|text_decoder)\.")


def _torch_load(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as err:  # noqa: BLE001
        raise WeightsError(f"{path} could not be read as a {what} (torch checkpoint of tensors): {err}") from err
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors ({what})")
    return obj


def _strip_module(sd: dict) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def ram_state_dict(path: str | Path, model: RAMTagger) -> tuple[dict, dict]:
    """The tensors the tagger needs from a RAM checkpoint, and counts of what was ignored."""
    raw = _torch_load(path, "RAM checkpoint")
    sd = raw.get("model", raw)
    sd = {k.replace("vision_multi", "tagging_head"): v for k, v in _strip_module(sd).items()}
    expected = model.state_dict()
    ignored: Counter = Counter()
    unknown = []
    for key in list(sd):
        if key in expected:
            continue
        rule = next((r.pattern for r in IGNORED_RAM if r.search(key)), None)
        if rule:
            ignored[rule] += 1
        else:
            unknown.append(key)
    # A head key may be missing where its tied Tag2Text twin holds the same tensor.
    for key in expected:
        if key not in sd and key.startswith("tagging_head.encoder.layer."):
            twin = "tag_encoder." + key[len("tagging_head."):]
            if twin in sd:
                sd[key] = sd[twin]
    missing = [k for k in expected if k not in sd]
    mismatched = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or mismatched:
        raise WeightsError(describe_key_problems(
            str(path), missing=missing, mismatched=mismatched,
            hint="expected ram_swin_large_14m.pth (RAM Swin-L 384); relative position tables must have "
                 f"{(2 * model.config.window_size - 1) ** 2} rows",
        ))
    if unknown:
        warnings.warn(f"{path}: {len(unknown)} keys the tagger does not know were ignored, e.g. {unknown[:5]}")
    return {k: sd[k].float() for k in expected}, dict(ignored)


def merge_dape(sd: dict, path: str | Path, r_expected: int | None = None) -> dict:
    """Merge DAPE's LoRA deltas (scaling 1/r, alpha 1) into the RAM tensors in `sd`; returns an inventory."""
    dape = _strip_module(_torch_load(path, "DAPE LoRA file"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in dape.items():
        m = re.match(r"^(.*)\.(lora_A|lora_B)$", key)
        if not m:
            raise WeightsError(f"{path}: {key!r} is not a LoRA tensor; expected DAPE.pth (only lora_A/lora_B keys)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value.float()
    orphans = sorted(p for p, ab in pairs.items() if "lora_B" in ab and "lora_A" not in ab)
    if orphans:
        raise WeightsError(f"{path}: lora_B without lora_A for {orphans[:10]} (a random A would be merged)")
    inventory = Counter()
    for prefix, ab in sorted(pairs.items()):
        if "lora_B" not in ab:  # B missing: a zero delta
            continue
        a, b = ab["lora_A"], ab["lora_B"]
        if (SWIN_LORA.match(prefix) or HEAD_LORA.match(prefix)) and prefix + ".weight" not in sd:
            raise WeightsError(f"{path}: LoRA for {prefix} has no matching weight in the tagger; wrong DAPE file?")
        if SWIN_LORA.match(prefix):
            w = sd[prefix + ".weight"]
            c = w.shape[1]
            r = a.shape[0] // 2
            if a.shape != (2 * r, c) or b.shape != (2 * c, r):
                raise WeightsError(f"{path}: {prefix} LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit qkv {tuple(w.shape)}")
            w = w.clone()
            w[:c] += (b[:c] @ a[:r]) / r  # Q
            w[2 * c:] += (b[c:] @ a[r:]) / r  # V; K (rows c:2c) untouched, as loralib's enable_lora=[T, F, T]
            sd[prefix + ".weight"] = w
            inventory["visual_encoder"] += 2
        elif HEAD_LORA.match(prefix) or TIED_LORA.match(prefix):
            target = prefix if HEAD_LORA.match(prefix) else "tagging_head." + prefix[len("tag_encoder."):]
            if TIED_LORA.match(prefix):
                if not torch.any(b != 0):
                    continue
                warnings.warn(f"{path}: {prefix} has a non-zero LoRA B; merged into the tied tagging-head weight too")
            w = sd[target + ".weight"]
            r = a.shape[0]
            if a.shape[1] != w.shape[1] or b.shape != (w.shape[0], r):
                raise WeightsError(f"{path}: {prefix} LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit {tuple(w.shape)}")
            sd[target + ".weight"] = w + (b @ a) / r
            inventory["tagging_head" if HEAD_LORA.match(prefix) else "tied_tag_encoder"] += 2
        elif UNUSED_LORA.match(prefix):
            inventory["ignored"] += 2
        else:
            warnings.warn(f"{path}: LoRA for {prefix!r} has no place in the tagger; ignored")
        if r_expected is not None and (SWIN_LORA.match(prefix) or HEAD_LORA.match(prefix)) and r != r_expected:
            raise WeightsError(f"{path}: LoRA rank {r} for {prefix}, expected {r_expected}")
    if not inventory.get("tagging_head"):
        warnings.warn(f"{path}: no tagging-head LoRA found; only the image encoder is adapted")
    return dict(inventory)


def load_tagger(
    ram_path: str | Path,
    dape_path: str | Path | None = None,
    *,
    config: RAMConfig = RAMConfig(),
    tag_list: str | Path = TAG_LIST,
    thresholds: str | Path = THRESHOLDS,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    antialias: bool = False,
) -> RAMTagger:
    """RAM + DAPE as SeeSR runs it (fp32 by default, as the authors did)."""
    tags, thr = read_tag_list(tag_list), read_thresholds(thresholds)
    with torch.device("meta"):
        model = RAMTagger(config, tags, thr, antialias=antialias)
    sd, ignored = ram_state_dict(ram_path, model)
    log.info("RAM %s: %d tensors used, ignored by rule: %s", ram_path, len(sd), ignored)
    if dape_path is not None:
        inventory = merge_dape(sd, dape_path, r_expected=config.lora_r)
        log.info("DAPE %s merged: %s", dape_path, inventory)
    model = RAMTagger(config, tags, thr, antialias=antialias)
    model.load_state_dict(sd, strict=True)
    model.refresh_label_queries()
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.thresholds = thr.float().to(device)  # compared in fp32 whatever the model dtype (0.65 is not fp16-exact)
    return model
