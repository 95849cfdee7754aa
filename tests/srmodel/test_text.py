"""Prompt assembly as released, the fixed tagger, and the CLIP text conditioner on the tiny model."""

import re
import shutil

import numpy as np
import pytest
import torch

from srmodel import FixedTagger, TextConditioner, build_prompt
from srmodel.config import NEGATIVE_PROMPT, SYNTHETIC_ADDED_PROMPT, WILD_ADDED_PROMPT
from srmodel.tiny import TEXT_DIM

WILD = "clean, high-resolution, 8k, ultra-detailed, ultra-realistic"


# ----------------------------------------------------------------------------- build_prompt


def test_added_prompts_are_the_released_ones():
    assert WILD_ADDED_PROMPT == WILD
    assert SYNTHETIC_ADDED_PROMPT == "clean, high-resolution, 8k"
    assert NEGATIVE_PROMPT == "dotted, noise, blur, lowres, smooth"


def test_build_prompt_no_user_prompt():
    assert build_prompt("dog, grass", "", WILD) == "dog, grass, ,clean, high-resolution, 8k, ultra-detailed, ultra-realistic"


def test_build_prompt_with_user_prompt():
    assert build_prompt("dog, grass", "a photo", WILD) == (
        "dog, grass, a photo,clean, high-resolution, 8k, ultra-detailed, ultra-realistic"
    )


def test_build_prompt_empty_tags():
    assert build_prompt("", "", WILD) == ", ,clean, high-resolution, 8k, ultra-detailed, ultra-realistic"


def test_build_prompt_defaults_and_synthetic():
    assert build_prompt("cat") == "cat, ,"
    assert build_prompt("cat", "", SYNTHETIC_ADDED_PROMPT) == "cat, ,clean, high-resolution, 8k"


# ----------------------------------------------------------------------------- FixedTagger


def test_fixed_tagger():
    images = [np.zeros((8, 8, 3), np.uint8), np.full((4, 6, 3), 255, np.uint8), np.zeros((2, 2, 3), np.uint8)]
    assert FixedTagger("dog, grass")(images) == ["dog, grass"] * 3
    assert FixedTagger()(images[:1]) == [""]
    assert FixedTagger("x")([]) == []
    out = FixedTagger("tree")(images)
    assert isinstance(out, list) and all(isinstance(t, str) for t in out)


# ----------------------------------------------------------------------------- TextConditioner


@pytest.fixture(scope="module")
def conditioner(tiny_model):
    return TextConditioner.from_pretrained(tiny_model.sd_base)


def test_output_shape_and_dtype(conditioner):
    out = conditioner.encode(["dog, grass, ,clean", "a cat"])
    assert out.shape == (2, 77, TEXT_DIM)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.device == conditioner.device == torch.device("cpu")
    assert not out.requires_grad
    assert not any(p.requires_grad for p in conditioner.text_encoder.parameters())
    assert not conditioner.text_encoder.training


def test_deterministic(conditioner, tiny_model):
    prompt = build_prompt("dog, grass", "", WILD)
    a = conditioner.encode([prompt])
    b = conditioner.encode([prompt])
    assert torch.equal(a, b)
    other = TextConditioner.from_pretrained(tiny_model.sd_base)
    torch.testing.assert_close(other.encode([prompt]), a, atol=0, rtol=0)


def test_batch_rows_independent(conditioner):
    batch = conditioner.encode(["dog", "a much longer prompt about a cat"])
    torch.testing.assert_close(batch[0], conditioner.encode(["dog"])[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(batch[1], conditioner.encode(["a much longer prompt about a cat"])[0], atol=1e-6, rtol=0)


def test_different_prompts_differ(conditioner):
    out = conditioner.encode(["dog, grass", "cat, sofa", ""])
    assert (out[0] - out[1]).abs().max() > 1e-3
    assert (out[0] - out[2]).abs().max() > 1e-3


def test_long_prompt_is_truncated(conditioner):
    tok = conditioner.tokenizer
    assert tok.model_max_length == 77
    long = ", ".join(f"tag{i}" for i in range(40))
    assert len(tok(long).input_ids) > 77  # really over the limit
    tail = long + ", and, some, extra, words, beyond, the, limit"
    a, b = conditioner.encode([long, tail])
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Within the limit the tail does count.
    short = conditioner.encode(["dog", "dog, grass"])
    assert (short[0] - short[1]).abs().max() > 1e-3


def test_missing_tokenizer_folder(tiny_model, tmp_path):
    sd = tmp_path / "sd2-base"
    shutil.copytree(tiny_model.sd_base, sd, ignore=shutil.ignore_patterns("tokenizer"))
    assert not (sd / "tokenizer").exists()
    with pytest.raises(FileNotFoundError) as info:
        TextConditioner.from_pretrained(sd)
    assert str(sd / "tokenizer") in str(info.value)


def test_missing_text_encoder_folder(tiny_model, tmp_path):
    sd = tmp_path / "sd2-base"
    shutil.copytree(tiny_model.sd_base, sd, ignore=shutil.ignore_patterns("text_encoder"))
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        TextConditioner.from_pretrained(sd)


def test_missing_sd_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere" / "tokenizer"))):
        TextConditioner.from_pretrained(tmp_path / "nowhere")
