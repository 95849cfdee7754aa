"""The real-size random release: parameter counts against the released ones, its file writers, and (marked
`realsize`) the whole release written in fp16 and loaded through the real loaders."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from srmodel.models import release_configs as rc
from srmodel.realsize import fill, materialize, write_safetensors

KEYS_TXT = Path(__file__).resolve().parents[1] / "data" / "reference" / "image_attention_keys.txt"


def image_attention_counts() -> dict[str, int]:
    """{"UNet": n, "ControlNet": n}: the released image_attentions' parameters, summed from the key list."""
    totals, section = {}, None
    for line in KEYS_TXT.read_text().splitlines():
        if line.startswith("## "):
            section = line.split()[1]
            totals[section] = 0
        elif not line.startswith("#") and (shape := re.search(r"\[([\d, ]+)\]", line)):
            totals[section] += math.prod(int(x) for x in shape.group(1).split(","))
    return totals


def test_counts_match_the_released_ones():
    counts = rc.meta_counts()
    wrong = {part: (n, rc.RELEASED_PARAMS[part]) for part, n in counts.items() if not rc.within_tolerance(part, n)}
    assert not wrong, f"parameter counts off by more than 1% (built, released): {wrong}"
    # The exact ones, and the image_attentions' share taken from the released key list itself.
    attn = image_attention_counts()
    assert counts["unet"] == rc.RELEASED_PARAMS["sd2_unet"] + attn["UNet"]
    assert counts["controlnet"] == rc.RELEASED_PARAMS["controlnet"] and attn["ControlNet"] == 124_803_200
    for part in ("vae", "text_encoder", "ram"):
        assert counts[part] == rc.RELEASED_PARAMS[part], part


def test_dape_count_is_the_released_files(tmp_path):
    """DAPE.pth as written at Swin-L size: 248 LoRA tensors, ≈1.78 M (RAM_DAPE.md §2.2)."""
    from srmodel.ram.export import save_dape

    with rc.params_on_meta():
        ram = rc.build_ram()
    save_dape(ram, tmp_path / "DAPE.pth", torch.Generator().manual_seed(0), tag2text=True)
    lora = torch.load(tmp_path / "DAPE.pth", weights_only=True)
    assert len(lora) == 248
    assert sum(t.numel() for t in lora.values()) == rc.RELEASED_PARAMS["dape"]


def test_release_configs_pass_the_strict_loaders_checks():
    from srmodel.models.controlnet import SemanticControlNet
    from srmodel.models.unet import SemanticUNet

    assert SemanticUNet._init_kwargs(rc.RELEASE_UNET_CONFIG, "unet")["use_image_cross_attention"] is True
    kwargs = SemanticControlNet._init_kwargs(rc.RELEASE_CONTROLNET_CONFIG, "controlnet")
    assert kwargs["conditioning_embedding_out_channels"] == [16, 32, 96, 256]


def test_safetensors_written_tensor_by_tensor_read_back(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = {"b.weight": torch.randn(3, 5), "a": torch.randn(7).half(), "index": torch.arange(4), "s": torch.tensor(2.0)}
    path = tmp_path / "m.safetensors"
    write_safetensors(state, path)
    back = load_file(str(path))
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_fill_is_seeded_per_name_and_keeps_norm_gains_near_one():
    def build():
        with rc.params_on_meta():
            return nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 8))

    a, b = materialize(build(), torch.float16), materialize(build(), torch.float16)
    fill(a, seed=1)
    fill(b, seed=1)
    assert all(p.dtype == torch.float16 and not p.is_meta for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert (a[1].weight - 1).abs().max() < 0.2 and a[2].bias.abs().max() < 0.2
    assert a[0].weight.float().std().item() == pytest.approx(64**-0.5, rel=0.1)
    assert all(p.abs().sum() > 0 for p in a.parameters())  # no zero-initialised layer left


def test_tokenizer_has_clip_size_and_special_ids(tmp_path):
    from transformers import CLIPTokenizer

    from srmodel.models.tokenizer_files import VOCAB_SIZE, write_clip_tokenizer

    write_clip_tokenizer(tmp_path, rc.SD2_TOKENIZER_CONFIG)
    assert len(json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))) == VOCAB_SIZE == 49_408
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 49_408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (49406, 49407, "!", 0)
    ids = tok(["a dog on the grass"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[0] == 49406 and 49407 in ids and ids[-1] == 0
    assert tok.convert_ids_to_tokens(ids[1:3]) == ["a</w>", "dog</w>"]


def test_fp16_needs_the_real_size(tmp_path):
    from srmodel.tiny import main, write_released_layout

    with pytest.raises(SystemExit):
        main([str(tmp_path / "w"), "--dtype", "fp16"])
    with pytest.raises(ValueError, match="fp32 only"):
        write_released_layout(tmp_path / "w", dtype="fp16")


@pytest.mark.slow
@pytest.mark.realsize
def test_real_size_release_loads_through_the_real_loaders(tmp_path):
    """Minutes and ~4.6 GB of disk: the fp16 release, loaded as `ugcsr upscale --preset wild --weights DIR` does."""
    from pipelines.cli.upscale import released_source
    from srmodel import stages
    from srmodel.presets import get_preset
    from srmodel.tiny import main, write_released_layout

    folder = tmp_path / "weights"
    lines: list[str] = []
    source = write_released_layout(folder, size="real", dtype="fp16", log=lines.append)
    print("\n".join(lines))
    assert source == released_source(str(folder), "wild")
    assert [line.split()[0] for line in lines] == [
        "unet", "controlnet", "vae", "text_encoder", "sam2", "tokenizer", "ram", "dape"]
    config = get_preset("wild", source)

    encoder = stages.load_semantic_encoder(config)
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    tokens = encoder.encode([image])
    # 4,096 tokens of width 256 (the authors' 512-wide concat is done inside the diffusion model).
    assert tokens.shape == (1, 4096, 256) and torch.isfinite(tokens).all()
    del encoder

    tagger = stages.load_tagger(config)
    assert tagger.thresholds.shape == (4585,)
    assert isinstance(tagger([np.asarray(image)])[0], str)
    del tagger

    up = stages.load_upscaler(config)
    text = up.text.encode(["a dog on the grass"])
    assert text.shape == (1, 77, 1024) and torch.isfinite(text).all()
    assert up.unet.dtype == torch.float16 and up.unet.config.block_out_channels == [320, 640, 1280, 1280]
    assert len(up.controlnet.controlnet_down_blocks) == 12
    with torch.no_grad():  # one small fp16 pass of ControlNet -> UNet: finite (random weights, no quality)
        latent = torch.randn(1, 4, 8, 8, dtype=torch.float16)
        cond = torch.rand(1, 3, 64, 64, dtype=torch.float16)
        t = torch.tensor([500])
        down, mid = up.controlnet(latent, t, text, cond, tokens, return_dict=False)
        out = up.unet(latent, t, text, tokens, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid, return_dict=False)[0]
    assert out.shape == latent.shape and torch.isfinite(out).all()
    with pytest.raises(SystemExit):  # the folder is taken now
        main([str(folder), "--size", "real"])
