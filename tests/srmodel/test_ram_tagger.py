"""RAM (Swin-L) + DAPE tagger: the test plan of shared/docs/RAM_DAPE.md §7.

Everything runs on a tiny random model (TINY_RAM_CONFIG) whose weights are exported
under the real checkpoint names, junk included, and saved with torch.save into tmp_path;
no binary fixture is committed. Only test 13 needs the released files (env vars).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srmodel.errors import WeightsError
from srmodel.prompts import build_prompt
from srmodel.ram import (
    TINY_RAM_CONFIG,
    RAMConfig,
    RAMTagger,
    check_data_files,
    load_tagger,
    merge_dape,
    ram_state_dict,
    read_tag_list,
    read_thresholds,
    tags_from_probs,
)
from srmodel.ram import model as ram_model

CFG = TINY_RAM_CONFIG
R = 8  # LoRA rank (alpha 1, scaling 1/r)
TAGS = ["3D CG rendering", "blue sky", "cat", "dog", "person", "tree", "zoo"]
THRS = ["0.65", "0.80", "0.90", "0.50", "0.86", "0.80", "0.70"]
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])
DATA = Path(ram_model.__file__).parent / "data"
# Section 5: the sha256 of the authors' files, pinned here independently of model.SHA256.
SPEC_SHA256 = {
    "ram_tag_list.txt": "5d96d2f7225527480ad773aaac76b6e5c08a18adf6eae9ca7d2ab923d5e7bd8b",
    "ram_tag_list_chinese.txt": "c912657a0f30be7b2f5df6ccffa17e1d84561d0bea508528e38b6d0d711bcfbe",
    "ram_tag_list_threshold.txt": "b6f81d0de1bc7f9c251af512c413eae976c77dbfbadf700d4e3d90510f4c6447",
}
NEVER_FIRE = {"body", "cocktail table", "French", "group", "lie", "show", "see", "set", "stop", "use"}
IGNORE_RULES = {  # loading.IGNORED_RAM patterns -> what the fixture checkpoint adds for each
    r"\.relative_position_index$": "buffers",
    r"\.attn_mask$": "buffers",
    r"^tag_encoder\.": "tag2text",
    r"^text_decoder\.": "tag2text",
    r"^tagging_head\.embeddings\.": "legacy",
    r"^tagging_head\.encoder\.layer\.\d+\.attention\.": "legacy",
}


# ---------------------------------------------------------------------------------------------- fixtures


def _blocks(model: RAMTagger):
    """(i, j, block) for every Swin block."""
    for i, stage in enumerate(model.visual_encoder.layers):
        for j, blk in enumerate(stage.blocks):
            yield i, j, blk


def _randomise(model: RAMTagger, gen: torch.Generator) -> None:
    """Every parameter gets a fresh random value (LayerNorm affines included): none stays at its init."""
    init = {k: v.clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and ("norm" in name.lower()) and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)  # LayerNorm gain
            elif p.ndim == 1:
                p.copy_(0.1 * noise)  # biases, LayerNorm shifts
            elif "relative_position_bias_table" in name:
                p.copy_(0.5 * noise)
            elif name == "label_embed":
                p.copy_(noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)  # weights: unit-variance outputs
    for name, p in model.named_parameters():
        assert not torch.equal(p, init[name]), name


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """The tiny RAM checkpoint (+ vision_multi variant) and DAPE files, as §7 "Fixtures" describes."""
    tmp = tmp_path_factory.mktemp("ram")
    gen = torch.Generator().manual_seed(1234)
    tag_path, thr_path = tmp / "tags.txt", tmp / "thr.txt"
    tag_path.write_text("\n".join(TAGS), encoding="utf-8")  # no final newline, as RAM's file
    thr_path.write_text("\n".join(THRS) + "\n")
    model = RAMTagger(CFG, TAGS, read_thresholds(thr_path))
    _randomise(model, gen)
    model.refresh_label_queries()
    model.eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    H, P = CFG.head_hidden, CFG.proj_dim

    # --- RAM checkpoint under the real names, with the junk of the real file
    sd = dict(base)
    n_buffers = 0
    for i, j, blk in _blocks(model):
        sd[f"visual_encoder.layers.{i}.blocks.{j}.attn.relative_position_index"] = blk.attn.relative_position_index.clone()
        n_buffers += 1
        if blk.attn_mask is not None:
            sd[f"visual_encoder.layers.{i}.blocks.{j}.attn_mask"] = blk.attn_mask.clone()
            n_buffers += 1
    tag2text = {
        "tag_encoder.embeddings.word_embeddings.weight": torch.randn(11, H, generator=gen),
        "tag_encoder.encoder.layer.0.attention.self.query.weight": torch.randn(H, H, generator=gen),
        "tag_encoder.encoder.layer.0.attention.self.query.bias": torch.randn(H, generator=gen),
        "tag_encoder.encoder.layer.5.output.dense.weight": torch.randn(H, 4, generator=gen),
        "text_decoder.bert.embeddings.word_embeddings.weight": torch.randn(13, H, generator=gen),
        "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight": torch.randn(H, P, generator=gen),
        "text_decoder.cls.predictions.bias": torch.randn(13, generator=gen),
    }
    sd.update(tag2text)
    # The tied Tag2Text twins: tag_encoder layers 0-1 hold the head's tensors under their own names.
    twins = {"tag_encoder." + k[len("tagging_head."):]: v.clone() for k, v in base.items() if k.startswith("tagging_head.")}
    assert any(".crossattention." in k for k in twins) and all(re.match(r"tag_encoder\.encoder\.layer\.[01]\.", k) for k in twins)
    sd.update(twins)
    legacy = {  # deleted in RAM's head; ignored by name if a file has them
        "tagging_head.embeddings.LayerNorm.weight": torch.randn(H, generator=gen),
        "tagging_head.encoder.layer.0.attention.self.query.weight": torch.randn(H, H, generator=gen),
    }
    sd.update(legacy)
    ram_path = _save({"model": sd, "epoch": 7}, tmp / "ram.pth")
    # (without the twins, so that the head can only come from the renamed vision_multi.* keys)
    vm = {("vision_multi." + k[len("tagging_head."):] if k.startswith("tagging_head.") else k): v
          for k, v in sd.items() if k not in twins}
    assert sum(k.startswith("vision_multi.") for k in vm) > 10
    vm_path = _save({"model": vm}, tmp / "ram_vision_multi.pth")

    # --- DAPE: random LoRA for every Swin qkv (A (2r, C), B (2C, r)) and the head's query/key
    dape = {}
    for i, j, blk in _blocks(model):
        c = blk.attn.qkv.in_features
        pre = f"visual_encoder.layers.{i}.blocks.{j}.attn.qkv"
        dape[pre + ".lora_A"] = 0.3 * torch.randn(2 * R, c, generator=gen)
        dape[pre + ".lora_B"] = 0.3 * torch.randn(2 * c, R, generator=gen)
    for layer in range(CFG.head_layers):
        for name, inp in (("query", H), ("key", P)):
            pre = f"tagging_head.encoder.layer.{layer}.crossattention.self.{name}"
            dape[pre + ".lora_A"] = 0.3 * torch.randn(R, inp, generator=gen)
            dape[pre + ".lora_B"] = 0.3 * torch.randn(H, R, generator=gen)
    # Tag2Text LoRA: never trained, so B = 0 (A random, as loralib's kaiming init)
    for enc, layers in (("tag_encoder.encoder", 3), ("text_decoder.bert.encoder", 2)):
        for layer in range(layers):
            for att in ("attention", "crossattention"):
                for name in ("query", "key"):
                    inp = P if (att == "crossattention" and name == "key") else H
                    pre = f"{enc}.layer.{layer}.{att}.self.{name}"
                    dape[pre + ".lora_A"] = torch.randn(R, inp, generator=gen)
                    dape[pre + ".lora_B"] = torch.zeros(H, R)
    dape_path = _save(dape, tmp / "dape.pth")
    zero = {k: (torch.zeros_like(v) if k.endswith("lora_B") else v) for k, v in dape.items()}
    zero_path = _save(zero, tmp / "dape_zero.pth")
    tied = dict(dape)
    tied["tag_encoder.encoder.layer.0.crossattention.self.query.lora_B"] = 0.3 * torch.randn(H, R, generator=gen)
    tied_path = _save(tied, tmp / "dape_tied.pth")

    pixels = torch.randn(2, 3, CFG.img_size, CFG.img_size, generator=gen)
    return dict(
        tmp=tmp, base=base, sd=sd, ram=ram_path, vision_multi=vm_path, dape=dape, dape_path=dape_path,
        zero_path=zero_path, tied=tied, tied_path=tied_path, pixels=pixels, n_buffers=n_buffers,
        n_tag2text=len(tag2text) + len(twins), n_legacy=len(legacy), tags=tag_path, thr=thr_path,
    )


@pytest.fixture(scope="module")
def tiny(fx):
    """RAM alone and RAM + DAPE, loaded once (tests only read them)."""
    return {"ram": _load(fx), "dape": _load(fx, fx["dape_path"])}


def _load(fx, dape=None, ram=None, **kw) -> RAMTagger:
    return load_tagger(ram or fx["ram"], dape, config=CFG, tag_list=fx["tags"], thresholds=fx["thr"], **kw)


def _meta_model(thr_path) -> RAMTagger:
    with torch.device("meta"):
        return RAMTagger(CFG, TAGS, read_thresholds(thr_path))


def _logits(model: RAMTagger, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward(pixels)


# ------------------------------------------------------------------------------------ 1. load inventory


def test_01_load_inventory(fx):
    meta = _meta_model(fx["thr"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real file's junk is known: no warning
        sd, ignored = ram_state_dict(fx["ram"], meta)
        inv = merge_dape(dict(sd), fx["dape_path"], r_expected=R)
        model = _load(fx, fx["dape_path"])
    assert set(sd) == set(meta.state_dict())  # 0 missing, nothing extra
    for k, v in sd.items():
        assert torch.equal(v, fx["base"][k]), k
    # ignored = exactly the buffer, Tag2Text and legacy groups, counted by rule
    groups = {"buffers": 0, "tag2text": 0, "legacy": 0}
    for rule, n in ignored.items():
        groups[IGNORE_RULES[rule]] += n
    assert groups == {"buffers": fx["n_buffers"], "tag2text": fx["n_tag2text"], "legacy": fx["n_legacy"]}
    assert sum(ignored.values()) == len(fx["sd"]) - len(sd)
    n_blocks = sum(CFG.depths)
    assert fx["n_buffers"] == n_blocks + 3  # an index per block, a mask per shifted block of stages 0-2
    n_tag2text_lora = sum(k.startswith(("tag_encoder", "text_decoder")) for k in fx["dape"])
    assert inv == {"visual_encoder": 2 * n_blocks, "tagging_head": 4 * CFG.head_layers, "ignored": n_tag2text_lora - 8}
    # (the tag_encoder layer 0-1 cross-attention query/key twins have B = 0: skipped, not counted)
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert model.fc.weight.dtype == torch.float32 and model.antialias is False


def test_01b_unknown_key_warns_and_tied_twin_fallback(fx, tmp_path):
    sd = dict(fx["sd"])
    sd["some_new_head.weight"] = torch.zeros(3)
    key = "tagging_head.encoder.layer.1.intermediate.dense.weight"
    del sd[key]  # the tied twin tag_encoder.encoder.layer.1.intermediate.dense.weight stands in
    path = _save({"model": sd}, tmp_path / "ram.pth")
    with pytest.warns(UserWarning, match="some_new_head"):
        got, _ = ram_state_dict(path, _meta_model(fx["thr"]))
    assert torch.equal(got[key], fx["base"][key])


# ------------------------------------------------------------------------------ 2. missing keys = errors


def test_02_missing_key_is_an_error(fx, tmp_path):
    sd = {k: v for k, v in fx["sd"].items() if k != "label_embed"}
    path = _save({"model": sd}, tmp_path / "ram.pth")
    with pytest.raises(WeightsError, match="label_embed"):
        _load(fx, ram=path)


def test_02_orphan_lora_b_is_an_error(fx, tmp_path):
    dape = dict(fx["dape"])
    del dape["visual_encoder.layers.2.blocks.1.attn.qkv.lora_A"]
    path = _save(dape, tmp_path / "dape.pth")
    with pytest.raises(WeightsError, match=r"lora_B without lora_A.*visual_encoder\.layers\.2\.blocks\.1\.attn\.qkv"):
        _load(fx, path)
    # A without B is a zero delta, not an error
    dape = dict(fx["dape"])
    del dape["visual_encoder.layers.2.blocks.1.attn.qkv.lora_B"]
    _load(fx, _save(dape, tmp_path / "dape_a_only.pth"))


def test_02_wrong_size_relative_position_table(fx, tmp_path):
    key = "visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"
    sd = dict(fx["sd"])
    sd[key] = torch.randn((2 * 4 - 1) ** 2, 1)  # a window-4 table: no resampling, an error
    path = _save({"model": sd}, tmp_path / "ram.pth")
    with pytest.raises(WeightsError, match=re.escape(key)) as err:
        _load(fx, ram=path)
    assert "25 rows" in str(err.value)


# ------------------------------------------------------------------------------------------- 3. shapes


def test_03_shapes(fx, tiny):
    model = tiny["dape"]
    pixels = fx["pixels"]
    assert model.forward(pixels).shape == (2, CFG.num_classes)
    assert model.image_embeds(pixels).shape == (2, 1 + 3 * 3, CFG.proj_dim)
    with pytest.raises(ValueError, match="96x96"):
        model.forward(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError):
        model.forward(torch.zeros(1, 3, 96, 128))
    # images -> one tag string per image, made of the tag list's names
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)]
    out = model(imgs)
    assert isinstance(out, list) and len(out) == 2
    for s in out:
        assert isinstance(s, str) and all(t in TAGS for t in s.split(", ") if s)
    assert model([]) == []
    # structure: every table has (2*3-1)^2 rows, shifted blocks (shift 1) in stages 0-2 only
    for i, j, blk in _blocks(model):
        assert blk.attn.relative_position_bias_table.shape == (25, CFG.num_heads[i])
        assert blk.shift == (1 if (j % 2 and i < 3) else 0)
    masks = [tuple(blk.attn_mask.shape) for _, _, blk in _blocks(model) if blk.attn_mask is not None]
    assert masks == [(64, 9, 9), (16, 9, 9), (4, 9, 9)]
    w = 3  # the relative index formula of §1.1
    idx = model.visual_encoder.layers[0].blocks[0].attn.relative_position_index
    for a in range(w * w):
        for b in range(w * w):
            (h1, w1), (h2, w2) = divmod(a, w), divmod(b, w)
            assert idx[a, b] == (h1 - h2 + w - 1) * (2 * w - 1) + (w1 - w2 + w - 1)


def test_03_real_size_model_on_meta():
    with torch.device("meta"):
        model = RAMTagger(RAMConfig(), read_tag_list(), read_thresholds())
    sd = model.state_dict()
    assert len(sd) == 366
    assert sum(p.numel() for p in model.parameters()) == 212_117_045
    assert sd["label_embed"].shape == (4585, 512)
    assert sd["visual_encoder.layers.3.blocks.1.attn.relative_position_bias_table"].shape == (529, 48)
    assert sd["visual_encoder.layers.2.blocks.17.attn.qkv.weight"].shape == (2304, 768)
    assert sd["tagging_head.encoder.layer.1.crossattention.self.key.weight"].shape == (768, 512)
    assert "visual_encoder.layers.2.downsample.reduction.weight" in sd
    assert "visual_encoder.layers.2.downsample.reduction.bias" not in sd
    assert not any(k.startswith("visual_encoder.layers.3.downsample") for k in sd)


def test_03b_head_matches_the_spec_recipe(fx, tiny):
    """§1.2-1.4 written out from the state dict: image_proj, ReLU label queries, 2 cross-attention + FFN layers."""
    model = tiny["dape"]
    sd = model.state_dict()
    lin = lambda x, k: F.linear(x, sd[k + ".weight"], sd.get(k + ".bias"))  # noqa: E731
    ln = lambda x, k: F.layer_norm(x, x.shape[-1:], sd[k + ".weight"], sd[k + ".bias"], eps=1e-12)  # noqa: E731
    with torch.no_grad():
        vis = model.visual_encoder(fx["pixels"])
        m = lin(vis, "image_proj")  # all 1 + HW tokens, mean token included
        h = torch.relu(lin(sd["label_embed"], "wordvec_proj")).expand(2, -1, -1)
        nh, d = CFG.head_heads, CFG.head_hidden // CFG.head_heads
        for layer in range(CFG.head_layers):
            pre = f"tagging_head.encoder.layer.{layer}."
            heads = lambda t: t.unflatten(-1, (nh, d)).transpose(1, 2)  # noqa: E731
            q, k, v = (heads(lin(x, pre + "crossattention.self." + n)) for x, n in ((h, "query"), (m, "key"), (m, "value")))
            ctx = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1) @ v
            a = ln(lin(ctx.transpose(1, 2).flatten(2), pre + "crossattention.output.dense") + h,
                   pre + "crossattention.output.LayerNorm")
            ff = lin(F.gelu(lin(a, pre + "intermediate.dense")), pre + "output.dense")
            h = ln(ff + a, pre + "output.LayerNorm")
        want = lin(h, "fc").squeeze(-1)
        got = model.forward(fx["pixels"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # (0.0 observed; LayerNorm eps 1e-5 gives ~5e-6)
    probs = want.sigmoid()
    assert model.thresholds.tolist() == [pytest.approx(float(t)) for t in THRS]
    assert tags_from_probs(probs, model.thresholds, TAGS) == [
        ", ".join(t for t, p, thr in zip(TAGS, row.tolist(), model.thresholds.tolist()) if p > thr) for row in probs
    ]


# ------------------------------------------------------------------------------------- 4. LoRA equivalence


@contextlib.contextmanager
def _lora_hooks(base: RAMTagger, dape: dict, expected: int):
    """The authors' unmerged forward: each LoRA'd linear gives base(x) + (1/r) B(A x), Swin on Q and V only."""
    handles = []
    for name, mod in base.named_modules():
        if name + ".lora_A" not in dape:
            continue
        a, b = dape[name + ".lora_A"], dape[name + ".lora_B"]
        if name.startswith("visual_encoder."):
            def hook(mod, inp, out, a=a, b=b):
                c, x = mod.in_features, inp[0]
                dq = (x @ a[:R].T) @ b[:c].T / R
                dv = (x @ a[R:].T) @ b[c:].T / R
                return out + torch.cat([dq, torch.zeros_like(dq), dv], -1)
        else:
            def hook(mod, inp, out, a=a, b=b):
                return out + (inp[0] @ a.T) @ b.T / R
        handles.append(mod.register_forward_hook(hook))
    assert len(handles) == expected
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def test_04_lora_merge_equals_unmerged_reference(fx, tiny):
    base, merged = tiny["ram"], tiny["dape"]
    pixels = fx["pixels"]
    ram_only = _logits(base, pixels)
    with _lora_hooks(base, fx["dape"], sum(CFG.depths) + 2 * CFG.head_layers):
        ref = _logits(base, pixels)
    got = _logits(merged, pixels)
    assert (got - ram_only).abs().max() > 1e-2  # DAPE really changes the logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert torch.equal(_logits(base, pixels), ram_only)  # hooks removed
    # image_embeds: the Swin LoRA alone
    swin = {k: v for k, v in fx["dape"].items() if k.startswith("visual_encoder.")}
    with torch.no_grad(), _lora_hooks(base, swin, sum(CFG.depths)):
        ref_embeds = base.image_embeds(pixels)
    with torch.no_grad():
        torch.testing.assert_close(merged.image_embeds(pixels), ref_embeds, rtol=0, atol=1e-5)


def test_04_zero_b_dape_is_ram_alone(fx, tiny):
    pixels = fx["pixels"]
    zero = _load(fx, fx["zero_path"])
    assert torch.equal(_logits(zero, pixels), _logits(tiny["ram"], pixels))
    for k, v in zero.state_dict().items():
        assert torch.equal(v, fx["base"][k]), k


# ------------------------------------------------------------------------------------- 5. slice placement


def test_05_slice_placement(fx, tiny):
    merged = tiny["dape"].state_dict()
    base = fx["base"]
    changed = set()
    for i, j, _ in _blocks(tiny["ram"]):
        key = f"visual_encoder.layers.{i}.blocks.{j}.attn.qkv.weight"
        w, w0 = merged[key], base[key]
        c = w.shape[1]
        assert torch.equal(w[c:2 * c], w0[c:2 * c]), f"{key}: K rows changed"
        assert (w[:c] != w0[:c]).any(1).all(), f"{key}: some Q row unchanged"
        assert (w[2 * c:] != w0[2 * c:]).any(1).all(), f"{key}: some V row unchanged"
        # exactly the loralib formula: group 0 (A rows 0:r, B rows 0:C) -> Q, group 1 -> V
        a, b = fx["dape"][key[:-7] + ".lora_A"], fx["dape"][key[:-7] + ".lora_B"]
        torch.testing.assert_close(w[:c], w0[:c] + b[:c] @ a[:R] / R, rtol=0, atol=1e-6)
        torch.testing.assert_close(w[2 * c:], w0[2 * c:] + b[c:] @ a[R:] / R, rtol=0, atol=1e-6)
        changed.add(key)
    for layer in range(CFG.head_layers):
        pre = f"tagging_head.encoder.layer.{layer}.crossattention.self."
        for name in ("query", "key"):
            assert (merged[pre + name + ".weight"] != base[pre + name + ".weight"]).any(1).all()
            changed.add(pre + name + ".weight")
        assert torch.equal(merged[pre + "value.weight"], base[pre + "value.weight"])
    # biases, value, and every other tensor: bit-identical
    for k, v in merged.items():
        if k not in changed:
            assert torch.equal(v, base[k]), k


# --------------------------------------------------------------------------------------------- 6. tie rule


def test_06_tie_rule(fx, tiny):
    with pytest.warns(UserWarning, match=r"tag_encoder\.encoder\.layer\.0\.crossattention\.self\.query.*non-zero"):
        model = _load(fx, fx["tied_path"])
    sd, base, d = model.state_dict(), fx["base"], fx["tied"]
    key = "tagging_head.encoder.layer.0.crossattention.self.query.weight"
    th, te = "tagging_head.encoder.layer.0.crossattention.self.query", "tag_encoder.encoder.layer.0.crossattention.self.query"
    expected = base[key] + (d[th + ".lora_B"] @ d[th + ".lora_A"] + d[te + ".lora_B"] @ d[te + ".lora_A"]) / R
    torch.testing.assert_close(sd[key], expected, rtol=0, atol=1e-6)
    # the other head weights get their own term only (their tag_encoder B is zero)
    plain = tiny["dape"].state_dict()
    assert not torch.allclose(sd[key], plain[key], atol=1e-4)
    for k, v in sd.items():
        if k != key:
            assert torch.equal(v, plain[k]), k


# ----------------------------------------------------------------------------------------- 7. legacy alias


def test_07_vision_multi_alias(fx, tiny):
    pixels = fx["pixels"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = _logits(_load(fx, fx["dape_path"], ram=fx["vision_multi"]), pixels)
    b = _logits(tiny["dape"], pixels)
    assert torch.equal(a, b)


# -------------------------------------------------------------------------------------- 8. post-processing


def test_08_tags_from_probs():
    thr = torch.tensor([float(t) for t in THRS])
    probs = torch.tensor([
        [0.90, 0.80, 0.95, 0.50, 0.20, 0.81, 0.71],  # 0.80 == 0.80 and 0.50 == 0.50: not selected
        [0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00],
        [0.66, 0.99, 0.91, 0.51, 0.87, 0.99, 0.9999],  # index order, not probability order
        [1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00],
    ])
    out = tags_from_probs(probs, thr, TAGS)
    assert out == [
        "3D CG rendering, cat, tree, zoo",
        "",
        ", ".join(TAGS),
        ", ".join(TAGS),
    ]
    assert tags_from_probs(torch.nextafter(thr, torch.tensor(2.0))[None], thr, TAGS) == [", ".join(TAGS)]
    assert tags_from_probs(thr[None].clone(), thr, TAGS) == [""]  # p == thr everywhere


def test_08_threshold_one_never_fires():
    tags, thr = read_tag_list(), read_thresholds()
    at_one = {t for t, v in zip(tags, thr.tolist()) if v >= 1.0}
    assert at_one == NEVER_FIRE
    (everything,) = tags_from_probs(torch.ones(1, len(tags)), thr, tags)
    selected = everything.split(", ")
    assert len(selected) == len(tags) - len(NEVER_FIRE)
    assert not NEVER_FIRE & set(selected)
    assert selected == [t for t in tags if t not in NEVER_FIRE]  # class-index order


# --------------------------------------------------------------------------------------- 9. prompt strings


def test_09_prompt_assembly():
    wild = "clean, high-resolution, 8k, ultra-detailed, ultra-realistic"
    assert build_prompt("building, city, sky", "", wild) == (
        "building, city, sky, ,clean, high-resolution, 8k, ultra-detailed, ultra-realistic"
    )
    assert build_prompt("", "", wild) == ", ,clean, high-resolution, 8k, ultra-detailed, ultra-realistic"
    assert build_prompt("dog, grass", "a photo", "clean, high-resolution, 8k") == (
        "dog, grass, a photo,clean, high-resolution, 8k"
    )
    assert build_prompt("cat", "None", "clean") == "cat, None,clean"  # the old --prompt None quirk
    assert build_prompt("cat") == "cat, ,"


# ---------------------------------------------------------------------------------------- 10. preprocessing


def test_10_preprocessing(fx):
    real = RAMTagger(CFG.model_copy(update={"img_size": 384}), TAGS, read_thresholds(fx["thr"]))
    gray = np.full((50, 70, 3), 128, np.uint8)  # uint8 "0.5 gray" = 128/255
    x = real.preprocess([gray])
    assert x.shape == (1, 3, 384, 384) and x.dtype == torch.float32
    want = (128 / 255 - MEAN) / STD
    torch.testing.assert_close(x, want.view(1, 3, 1, 1).expand_as(x), rtol=0, atol=1e-6)

    tiny = RAMTagger(CFG, TAGS, read_thresholds(fx["thr"]))
    black, white = (-MEAN / STD).view(3, 1, 1), ((1 - MEAN) / STD).view(3, 1, 1)

    def is_(t, v):
        return torch.allclose(t, v.expand_as(t), atol=1e-6)

    halves = np.zeros((40, 160, 3), np.uint8)
    halves[:, 80:] = 255  # wide image, left half black: squashed, the halves stay halves
    (y,) = tiny.preprocess([halves])
    assert y.shape == (3, 96, 96)
    assert is_(y[:, :, :46], black) and is_(y[:, :, 49:], white)
    quarter = np.full((40, 160, 3), 255, np.uint8)
    quarter[:, :40] = 0  # the left quarter survives (a centre crop would drop it)
    (y,) = tiny.preprocess([quarter])
    assert is_(y[:, :, :22], black) and is_(y[:, :, 26:], white)
    tall = np.full((200, 30, 3), 255, np.uint8)
    tall[:50] = 0  # top quarter of a tall image
    (y,) = tiny.preprocess([tall])
    assert is_(y[:, :22], black) and is_(y[:, 26:], white)

    # antialias: off by default (SeeSR resized the tensor with torchvision 0.15's default)
    assert inspect.signature(RAMTagger.__init__).parameters["antialias"].default is False
    assert inspect.signature(load_tagger).parameters["antialias"].default is False
    assert tiny.antialias is False
    img = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    norm = lambda u: (u - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)  # noqa: E731
    plain = norm(F.interpolate(t, (96, 96), mode="bilinear", align_corners=False, antialias=False))
    smooth = norm(F.interpolate(t, (96, 96), mode="bilinear", align_corners=False, antialias=True))
    torch.testing.assert_close(tiny.preprocess([img]), plain, rtol=0, atol=1e-6)
    assert (plain - smooth).abs().max() > 0.1
    aa = RAMTagger(CFG, TAGS, read_thresholds(fx["thr"]), antialias=True)
    torch.testing.assert_close(aa.preprocess([img]), smooth, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        tiny.preprocess([img.astype(np.float32)])


# ----------------------------------------------------------------------------------------- 11. data files


def test_11_data_files(tmp_path, monkeypatch):
    for name in SPEC_SHA256:
        lines = (DATA / name).read_text(encoding="utf-8").splitlines()
        assert len(lines) == 4585, name
    tags = read_tag_list()
    assert len(tags) == 4585 and len(set(tags)) == 4585
    assert tags[0] == "3D CG rendering" and tags[-1] == "zoo"
    assert sum(" " in t for t in tags) == 1413 and not any("," in t for t in tags)
    thr = read_thresholds()
    assert thr.shape == (4585,) and thr.dtype == torch.float32
    raw = [float(line.strip()) for line in (DATA / "ram_tag_list_threshold.txt").read_text().splitlines()]
    assert len(raw) == 4585 and len(set(raw)) == 44
    assert min(raw) == 0.45 and max(raw) == 1.0
    assert torch.equal(thr, torch.tensor(raw, dtype=torch.float32))
    assert raw.count(0.65) == 3414 and raw.count(0.8) == 735 and raw.count(0.9) == 119
    by_name = dict(zip(tags, raw))
    assert by_name["person"] == 0.86 and by_name["sky"] == 0.7 and by_name["dog"] == 0.9 and by_name["car"] == 0.77

    # sha256 pins: the shipped files, model.SHA256 and section 5 agree
    assert ram_model.SHA256 == SPEC_SHA256
    for name, digest in SPEC_SHA256.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name
    check_data_files()
    # a corrupted copy does not match (and check_data_files rejects it)
    for name in SPEC_SHA256:
        (tmp_path / name).write_bytes((DATA / name).read_bytes())
    bad = bytearray((tmp_path / "ram_tag_list.txt").read_bytes())
    bad[-1:] = b"Z"  # "zoo" -> "zoZ"
    (tmp_path / "ram_tag_list.txt").write_bytes(bytes(bad))
    assert hashlib.sha256(bytes(bad)).hexdigest() != SPEC_SHA256["ram_tag_list.txt"]
    monkeypatch.setattr(ram_model, "DATA", tmp_path)
    with pytest.raises(RuntimeError, match="ram_tag_list.txt"):
        check_data_files()


# ------------------------------------------------------------------------------------ 12. timm cross-check


def test_12_swin_matches_timm(fx, tiny):
    timm = pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformer

    model = tiny["ram"]
    ref = SwinTransformer(img_size=96, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                          window_size=3, num_classes=0).eval()
    ours = {k[len("visual_encoder."):]: v for k, v in model.state_dict().items() if k.startswith("visual_encoder.")}

    def remap(k):  # RAM merges at the end of stage i, timm >= 0.9 at the start of stage i + 1
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        return f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}" if m else k

    ref.load_state_dict({remap(k): v for k, v in ours.items()}, strict=True)
    with torch.no_grad():
        feats = ref.forward_features(fx["pixels"]).flatten(1, 2)  # NHWC -> (B, HW, C), already normed
        want = torch.cat([feats.mean(1, keepdim=True), feats], 1)
        got = model.visual_encoder(fx["pixels"])
    assert timm.__version__ and got.shape == want.shape == (2, 10, 128)
    assert (got - want).abs().max() <= 1e-6


# ------------------------------------------------------------------------------------ 13. real weights


REAL = os.environ.get("UGCSR_RAM_PTH"), os.environ.get("UGCSR_DAPE_PTH")


@pytest.mark.skipif(
    not all(p and Path(p).is_file() for p in REAL),
    reason="real-weights smoke test: set UGCSR_RAM_PTH (ram_swin_large_14m.pth) and UGCSR_DAPE_PTH (DAPE.pth)",
)
def test_13_real_weights_smoke():
    ram_path, dape_path = REAL
    with torch.device("meta"):
        meta = RAMTagger(RAMConfig(), read_tag_list(), read_thresholds())
    sd, ignored = ram_state_dict(ram_path, meta)
    inv = merge_dape(sd, dape_path, r_expected=8)
    print(f"RAM: {len(sd)} needed keys, ignored {ignored}; DAPE: {inv}")
    assert len(sd) == 366
    assert inv["visual_encoder"] == 48 and inv.get("tagging_head", 0) in (0, 8)
    for k, v in sd.items():
        if k.endswith("relative_position_bias_table"):
            assert v.shape[0] == 529, k
    model = load_tagger(ram_path, dape_path)
    img = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    with torch.no_grad():
        logits = model.forward(model.preprocess([img]))
    assert logits.shape == (1, 4585) and torch.isfinite(logits).all()
    (tags,) = model([img])
    assert isinstance(tags, str)
    assert all(t in set(read_tag_list()) for t in tags.split(", ") if tags)
