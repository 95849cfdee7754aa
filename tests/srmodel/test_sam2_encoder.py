"""SemanticEncoder: SAM 2.1 image-path tokens, checkpoint loading, tiny test config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srmodel.errors import WeightsError
from srmodel.semantic.sam2_encoder import (
    DEFAULT_CONFIG,
    TINY_TEST_CONFIG,
    SemanticEncoder,
    resolve_config,
    save_sam2_checkpoint,
    widen_tokens,
)

TINY = "sam2.1_hiera_tiny_test.yaml"


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8),
        rng.integers(0, 256, size=(300, 200, 3), dtype=np.uint8),
    ]


@pytest.fixture(scope="module")
def tiny() -> SemanticEncoder:
    torch.manual_seed(0)
    enc = SemanticEncoder.from_config(TINY).eval()
    with torch.no_grad():  # random, non-zero no_mem_embed so adding it is visible
        enc.no_mem_embed.normal_(0, 1.0)
    return enc


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory) -> Path:
    return save_sam2_checkpoint(tiny, tmp_path_factory.mktemp("ckpt") / "tiny_sam2.pt")


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])


def _write(path: Path, state: dict, wrap: bool = True) -> Path:
    torch.save({"model": state} if wrap else state, path)
    return path


# --------------------------------------------------------------------------- config


def test_tiny_config_shapes(tiny):
    assert tiny.image_size == 256
    assert tiny.d_model == 256
    assert tiny.feature_stride == 16
    assert tiny.num_tokens == 256
    assert list(tiny.image_encoder.trunk.channel_list) == [64, 32, 16, 8]
    assert list(tiny.image_encoder.neck.backbone_channel_list) == [64, 32, 16, 8]
    assert Path(TINY_TEST_CONFIG).is_file()
    assert resolve_config(TINY) == Path(TINY_TEST_CONFIG)


def test_real_config_builds_with_official_key_names():
    enc = SemanticEncoder.from_config(DEFAULT_CONFIG)  # random init, no forward at 1024
    keys = set(enc.state_dict())
    assert "image_encoder.trunk.patch_embed.proj.weight" in keys
    assert "image_encoder.neck.convs.3.conv.weight" in keys
    assert "no_mem_embed" in keys
    assert all(k.startswith("image_encoder.") or k == "no_mem_embed" for k in keys)
    assert tuple(enc.no_mem_embed.shape) == (1, 1, 256)
    assert enc.image_size == 1024
    assert enc.feature_stride == 16
    assert enc.num_tokens == 4096
    # short name (and without suffix) resolves to the same sam2 package file
    assert resolve_config("sam2.1_hiera_t.yaml") == resolve_config(DEFAULT_CONFIG)
    assert resolve_config("sam2.1_hiera_t") == resolve_config(DEFAULT_CONFIG)


def test_unknown_config_names_what_was_tried(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        SemanticEncoder.from_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err.value)
    assert "tried" in str(err.value)


# --------------------------------------------------------------------------- outputs


def test_shapes_mixed_sizes(tiny):
    tokens = tiny.encode(_images())
    assert tokens.shape == (2, 256, 256)
    assert tokens.dtype == torch.float32
    assert torch.isfinite(tokens).all()
    assert not tokens.is_inference()  # usable as an ordinary tensor afterwards
    assert not tokens.requires_grad


def test_tokens_match_sam2_image_encoder_computed_independently(tiny, ckpt):
    """tokens == flatten(sam2 ImageEncoder vision_features) + no_mem_embed, no pos enc."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    # Independent sam2 ImageEncoder built straight from the yaml, loaded from the file.
    cfg = OmegaConf.load(TINY_TEST_CONFIG)
    ref = instantiate(cfg.model.image_encoder, _convert_="all").eval()
    state = _state(ckpt)
    ref.load_state_dict(
        {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    )
    no_mem = state["no_mem_embed"]

    # Independent pre-processing: [0,1] CHW, bilinear no-antialias resize, ImageNet norm.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    xs = []
    for img in _images():
        x = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
        x = F.interpolate(x[None], size=(256, 256), mode="bilinear", align_corners=False)[0]
        xs.append((x - mean) / std)
    x = torch.stack(xs)
    assert torch.allclose(tiny.preprocess(_images()), x, atol=1e-6)

    with torch.no_grad():
        out = ref(x)
        feats = out["vision_features"]
        assert feats.shape == (2, 256, 16, 16)
        expected = feats.flatten(2).permute(0, 2, 1) + no_mem

    loaded = SemanticEncoder.from_pretrained(ckpt, TINY)
    torch.testing.assert_close(loaded.encode(_images()), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny.encode(_images()), expected, atol=1e-5, rtol=1e-5)


def test_preprocess_matches_torchvision_tensor_resize(tiny):
    tv = pytest.importorskip("torchvision.transforms.v2.functional")
    img = _images()[1]
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
    x = tv.resize(x, [256, 256], antialias=False)
    x = tv.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(tiny.preprocess([img])[0], x, atol=1e-6, rtol=1e-6)


def test_preprocess_accepts_tensor_batches(tiny):
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, size=(2, 40, 60, 3), dtype=np.uint8)
    ref = tiny.preprocess(list(batch))
    bchw = torch.from_numpy(batch).permute(0, 3, 1, 2)
    torch.testing.assert_close(tiny.preprocess(bchw), ref)  # uint8 tensor
    torch.testing.assert_close(tiny.preprocess(bchw.float() / 255), ref)  # float tensor
    torch.testing.assert_close(tiny.preprocess(batch), ref)  # BHWC uint8 array
    torch.testing.assert_close(tiny.preprocess(batch[0]), ref[:1])  # one HWC image
    with pytest.raises(ValueError):
        tiny.preprocess([rng.integers(0, 256, size=(10, 10), dtype=np.uint8)])
    with pytest.raises(ValueError):
        tiny.preprocess([np.zeros((10, 10, 3), np.float64)])


def test_batch_independence(tiny):
    imgs = _images(5) + _images(6)
    together = tiny.encode(imgs)
    alone = torch.cat([tiny.encode([im]) for im in imgs])
    assert torch.allclose(together, alone, atol=1e-5)


def test_widen_tokens():
    t = torch.randn(2, 5, 256)
    w = widen_tokens(t)
    assert w.shape == (2, 5, 512)
    assert torch.equal(w[..., :256], t)
    assert torch.equal(w[..., 256:], t)


# --------------------------------------------------------------------------- checkpoints


def test_round_trip_and_loaded_state(tiny, ckpt):
    loaded = SemanticEncoder.from_pretrained(ckpt, TINY)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.encode(_images()), tiny.encode(_images()))


def test_junk_keys_present_and_ignored(ckpt):
    keys = set(_state(ckpt))
    for junk in (
        "sam_mask_decoder.conv_s0.weight",
        "memory_encoder.out_proj.weight",
        "obj_ptr_proj.layers.0.weight",
        "maskmem_tpos_enc",
    ):
        assert junk in keys
    loaded = SemanticEncoder.from_pretrained(ckpt, TINY)
    assert set(loaded.state_dict()) == {
        k for k in keys if k.startswith("image_encoder.") or k == "no_mem_embed"
    }


def test_save_without_extra_keys(tiny, tmp_path):
    path = save_sam2_checkpoint(tiny, tmp_path / "sub" / "plain.pt", extra_keys=False)
    assert set(_state(path)) == set(tiny.state_dict())


def test_bare_state_dict(tiny, ckpt, tmp_path):
    path = _write(tmp_path / "bare.pt", _state(ckpt), wrap=False)
    loaded = SemanticEncoder.from_pretrained(path, TINY)
    assert torch.equal(loaded.encode(_images()), tiny.encode(_images()))


def test_dtype_and_device(ckpt):
    loaded = SemanticEncoder.from_pretrained(ckpt, TINY, device="cpu", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    tokens = loaded.encode(_images())
    assert tokens.shape == (2, 256, 256)
    assert tokens.dtype == torch.bfloat16


def test_missing_key_is_named(ckpt, tmp_path):
    state = _state(ckpt)
    del state["image_encoder.neck.convs.3.conv.weight"]
    path = _write(tmp_path / "missing.pt", state)
    with pytest.raises(WeightsError) as err:
        SemanticEncoder.from_pretrained(path, TINY)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "image_encoder.neck.convs.3.conv.weight" in msg
    assert "1 missing" in msg
    assert str(path) in msg
    assert "sam2.1_hiera_tiny.pt" in msg


def test_missing_no_mem_embed(ckpt, tmp_path):
    state = _state(ckpt)
    del state["no_mem_embed"]
    with pytest.raises(WeightsError, match="no_mem_embed"):
        SemanticEncoder.from_pretrained(_write(tmp_path / "nomem.pt", state), TINY)


def test_many_missing_keys_are_capped(ckpt, tmp_path):
    state = {k: v for k, v in _state(ckpt).items() if not k.startswith("image_encoder.trunk.")}
    n_missing = sum(1 for k in _state(ckpt) if k.startswith("image_encoder.trunk."))
    assert n_missing > 10
    with pytest.raises(WeightsError) as err:
        SemanticEncoder.from_pretrained(_write(tmp_path / "notrunk.pt", state), TINY)
    msg = str(err.value)
    assert f"{n_missing} missing" in msg
    assert f"+{n_missing - 10} more" in msg


def test_wrong_shape(ckpt, tmp_path):
    state = _state(ckpt)
    state["no_mem_embed"] = torch.zeros(1, 1, 128)
    with pytest.raises(WeightsError) as err:
        SemanticEncoder.from_pretrained(_write(tmp_path / "shape.pt", state), TINY)
    msg = str(err.value)
    assert "no_mem_embed" in msg and "wrong shape" in msg and "128" in msg


def test_real_config_rejects_tiny_checkpoint(ckpt):
    with pytest.raises(WeightsError, match="wrong shape"):
        SemanticEncoder.from_pretrained(ckpt)  # default config = real Hiera-Tiny


def test_unexpected_image_encoder_key(ckpt, tmp_path):
    state = _state(ckpt)
    state["image_encoder.trunk.blocks.99.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsError) as err:
        SemanticEncoder.from_pretrained(_write(tmp_path / "extra.pt", state), TINY)
    msg = str(err.value)
    assert "image_encoder.trunk.blocks.99.attn.qkv.weight" in msg
    assert "unexpected" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        SemanticEncoder.from_pretrained(path, TINY)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a torch checkpoint\n")
    with pytest.raises(WeightsError) as err:
        SemanticEncoder.from_pretrained(path, TINY)
    assert "not a readable torch checkpoint" in str(err.value)
    assert str(path) in str(err.value)


def test_non_tensor_pickle_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"no_mem_embed": torch.zeros(1)}, "obj": Path("x")}, path)
    with pytest.raises(WeightsError, match="other than tensors"):
        SemanticEncoder.from_pretrained(path, TINY)
