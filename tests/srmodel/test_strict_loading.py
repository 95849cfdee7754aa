"""Strict loading of the released weight folders: clear errors, every file format, real-size key set."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import srmodel.models.image_attention as semantic_blocks
from srmodel import SemanticControlNet, SemanticUNet, WeightsError
from srmodel.models.strict_loading import WEIGHT_NAMES

REF = Path(__file__).parents[1] / "data" / "reference"
PARITY = REF / "parity"
KEYS_TXT = REF / "image_attention_keys.txt"
WEIGHTS = "diffusion_pytorch_model.safetensors"

# SD-2-base (stabilityai/stable-diffusion-2-base/unet/config.json), the released UNet's base.
SD2_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    use_linear_projection=True,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    center_input_sample=False,
    downsample_padding=1,
)
# ControlNetModel.from_unet(sd2_unet) as the release built it.
SD2_CONTROLNET_CONFIG = dict(
    {k: v for k, v in SD2_UNET_CONFIG.items() if k not in ("sample_size", "out_channels", "up_block_types", "center_input_sample")},
    conditioning_embedding_out_channels=[16, 32, 96, 256],
)

IMAGE_KEY = "down_blocks.0.image_attentions.1.transformer_blocks.0.attn2.to_k.weight"


class NotATensor:
    """A pickled Python object: weights_only loading must refuse it."""

    def __init__(self):
        self.payload = "arbitrary code could run here"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def parity_state():
    return load_file(str(PARITY / "unet" / WEIGHTS))


@pytest.fixture(scope="module")
def parity_unet():
    return SemanticUNet.from_pretrained(PARITY / "unet")


@pytest.fixture
def unet_dir(tmp_path):
    """A writable copy of the parity UNet folder."""
    folder = tmp_path / "unet"
    shutil.copytree(PARITY / "unet", folder)
    return folder


def write_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def load_error(folder, cls=SemanticUNet, **kw) -> str:
    with pytest.raises(WeightsError) as info:
        cls.from_pretrained(folder, **kw)
    return str(info.value)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def unet_forward(unet, v, dtype=torch.float32):
    return unet(
        v["sample"].to(dtype), v["timestep"],
        encoder_hidden_states=v["encoder_hidden_states"].to(dtype),
        image_encoder_hidden_states=v["image_encoder_hidden_states"].to(dtype),
        return_dict=False,
    )[0]


@pytest.fixture(scope="module")
def vectors():
    return load_file(str(PARITY / "vectors.safetensors"))


# ----------------------------------------------------------------------------- folder-level errors


def test_missing_folder(tmp_path):
    folder = tmp_path / "no_such_unet"
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
        SemanticUNet.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no_such_controlnet"):
        SemanticControlNet.from_pretrained(tmp_path / "no_such_controlnet")


def test_subfolder_argument(tmp_path):
    shutil.copytree(PARITY / "unet", tmp_path / "checkpoint" / "unet")
    unet = SemanticUNet.from_pretrained(tmp_path / "checkpoint", subfolder="unet")
    assert len(unet.state_dict()) == 1102
    with pytest.raises(FileNotFoundError, match="controlnet"):
        SemanticControlNet.from_pretrained(tmp_path / "checkpoint", subfolder="controlnet")


def test_folder_without_config(tmp_path):
    (tmp_path / "w").mkdir()
    shutil.copy(PARITY / "unet" / WEIGHTS, tmp_path / "w" / WEIGHTS)
    msg = load_error(tmp_path / "w")
    assert str(tmp_path / "w") in msg and "config.json" in msg


def test_wrong_class_config():
    msg = load_error(PARITY / "controlnet", SemanticUNet)
    assert "ControlNetModel" in msg and "UNet2DConditionModel" in msg
    assert str(PARITY / "controlnet" / "config.json") in msg
    msg = load_error(PARITY / "unet", SemanticControlNet)
    assert "UNet2DConditionModel" in msg and "ControlNetModel" in msg


def test_config_without_class_name(unet_dir):
    config = json.loads((unet_dir / "config.json").read_text())
    del config["_class_name"]
    (unet_dir / "config.json").write_text(json.dumps(config))
    assert "None" in load_error(unet_dir)


def test_invalid_json(unet_dir):
    (unet_dir / "config.json").write_text('{"_class_name": "UNet2DConditionModel",')
    msg = load_error(unet_dir)
    assert str(unet_dir / "config.json") in msg and "JSON" in msg


def test_no_weight_file(unet_dir):
    (unet_dir / WEIGHTS).unlink()
    msg = load_error(unet_dir)
    assert str(unet_dir) in msg and "no weight file" in msg
    for name in WEIGHT_NAMES:
        assert name in msg


def test_use_image_cross_attention_false(unet_dir):
    write_config(unet_dir, use_image_cross_attention=False)
    msg = load_error(unet_dir)
    assert "use_image_cross_attention" in msg and str(unet_dir / "config.json") in msg


def test_unknown_config_key(unet_dir):
    write_config(unet_dir, frobnicate_level=3)
    msg = load_error(unet_dir)
    assert "frobnicate_level" in msg and str(unet_dir / "config.json") in msg


def test_private_config_keys_are_ignored(unet_dir):
    write_config(unet_dir, _name_or_path="somewhere", _diffusers_version="0.99.0")
    SemanticUNet.from_pretrained(unet_dir)


def test_plain_sd2_unet_folder_is_refused(tmp_path):
    """A stock UNet2DConditionModel folder (no image_attentions) must not load as the released model."""
    from diffusers import UNet2DConditionModel

    config = json.loads((PARITY / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "use_image_cross_attention"}
    UNet2DConditionModel(**config).save_pretrained(tmp_path / "plain")
    msg = load_error(tmp_path / "plain")
    assert "416 missing keys" in msg and ".image_attentions." in msg and "(+406 more)" in msg


# ----------------------------------------------------------------------------- key-level errors


def test_missing_key(unet_dir, parity_state):
    state = dict(parity_state)
    del state[IMAGE_KEY]
    save_file(state, str(unet_dir / WEIGHTS))
    msg = load_error(unet_dir)
    assert str(unet_dir / WEIGHTS) in msg
    assert re.search(r"1 missing keys: " + re.escape(IMAGE_KEY), msg)
    assert "unexpected" not in msg and "wrong shape" not in msg


def test_unexpected_key(unet_dir, parity_state):
    state = dict(parity_state, **{"down_blocks.0.image_attentions.7.bogus.weight": torch.zeros(3)})
    save_file(state, str(unet_dir / WEIGHTS))
    msg = load_error(unet_dir)
    assert str(unet_dir / WEIGHTS) in msg
    assert "1 unexpected keys: down_blocks.0.image_attentions.7.bogus.weight" in msg
    assert "missing" not in msg


def test_wrong_shape(unet_dir, parity_state):
    state = dict(parity_state, **{IMAGE_KEY: torch.zeros(16, 256)})  # a folded K/V saved by mistake
    save_file(state, str(unet_dir / WEIGHTS))
    msg = load_error(unet_dir)
    assert str(unet_dir / WEIGHTS) in msg
    assert f"{IMAGE_KEY} (file (16, 256), model (16, 512))" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_all_problems_listed_at_once(unet_dir, parity_state):
    state = dict(parity_state)
    del state["conv_in.bias"]
    state["mid_block.image_attentions.0.extra"] = torch.zeros(2)
    state[IMAGE_KEY] = torch.zeros(16, 256)
    save_file(state, str(unet_dir / WEIGHTS))
    msg = load_error(unet_dir)
    assert "missing keys: conv_in.bias" in msg
    assert "unexpected keys: mid_block.image_attentions.0.extra" in msg
    assert "(file (16, 256), model (16, 512))" in msg
    assert "SemanticUNet" in msg  # the hint says what folder was expected


def test_controlnet_key_errors(tmp_path):
    folder = tmp_path / "controlnet"
    shutil.copytree(PARITY / "controlnet", folder)
    state = load_file(str(folder / WEIGHTS))
    del state["controlnet_mid_block.weight"]
    save_file(state, str(folder / WEIGHTS))
    msg = load_error(folder, SemanticControlNet)
    assert "missing keys: controlnet_mid_block.weight" in msg and str(folder / WEIGHTS) in msg


def test_corrupt_safetensors(unet_dir):
    (unet_dir / WEIGHTS).write_bytes(b"not a safetensors file")
    msg = load_error(unet_dir)
    assert str(unet_dir / WEIGHTS) in msg


# ----------------------------------------------------------------------------- file formats


def test_bin_format(unet_dir, parity_state, parity_unet, vectors):
    torch.save(parity_state, unet_dir / "diffusion_pytorch_model.bin")
    (unet_dir / WEIGHTS).unlink()
    unet = SemanticUNet.from_pretrained(unet_dir)
    assert_same_state(unet, parity_unet)
    with torch.no_grad():
        torch.testing.assert_close(unet_forward(unet, vectors), unet_forward(parity_unet, vectors), atol=0, rtol=0)


def test_bin_with_pickled_object_is_refused(unet_dir, parity_state):
    state = dict(parity_state)
    state["evil"] = NotATensor()
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
    (unet_dir / WEIGHTS).unlink()
    msg = load_error(unet_dir)
    assert str(unet_dir / "diffusion_pytorch_model.bin") in msg


def test_bin_that_is_not_a_dict(unet_dir, parity_state):
    torch.save(list(parity_state.values()), unet_dir / "diffusion_pytorch_model.bin")
    (unet_dir / WEIGHTS).unlink()
    msg = load_error(unet_dir)
    assert "list" in msg and "diffusion_pytorch_model.bin" in msg


def test_safetensors_preferred_over_bin(unet_dir, parity_unet):
    (unet_dir / "diffusion_pytorch_model.bin").write_bytes(b"garbage that must not be read")
    assert_same_state(SemanticUNet.from_pretrained(unet_dir), parity_unet)


def _shard(state, folder, name="diffusion_pytorch_model.safetensors.index.json"):
    keys = sorted(state)
    half = len(keys) // 2
    files = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
             "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    for file, ks in files.items():
        save_file({k: state[k] for k in ks}, str(folder / file))
    weight_map = {k: file for file, ks in files.items() for k in ks}
    (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def test_sharded_safetensors(unet_dir, parity_state, parity_unet):
    (unet_dir / WEIGHTS).unlink()
    _shard(parity_state, unet_dir)
    assert_same_state(SemanticUNet.from_pretrained(unet_dir), parity_unet)


def test_sharded_with_a_missing_shard(unet_dir, parity_state):
    (unet_dir / WEIGHTS).unlink()
    files = _shard(parity_state, unet_dir)
    (unet_dir / sorted(files)[1]).unlink()
    assert sorted(files)[1] in load_error(unet_dir)


def test_sharded_with_a_broken_index(unet_dir):
    (unet_dir / "diffusion_pytorch_model.safetensors.index.json").write_text('{"metadata": {}}')
    msg = load_error(unet_dir)
    assert "diffusion_pytorch_model.safetensors.index.json" in msg and "weight_map" in msg


def test_fp16_file_and_dtype_cast(unet_dir, parity_state):
    (unet_dir / WEIGHTS).unlink()
    half = {k: v.half() for k, v in parity_state.items()}
    save_file(half, str(unet_dir / "diffusion_pytorch_model.fp16.safetensors"))
    unet = SemanticUNet.from_pretrained(unet_dir)
    assert {p.dtype for p in unet.parameters()} == {torch.float16}
    assert torch.equal(unet.state_dict()[IMAGE_KEY], half[IMAGE_KEY])
    unet32 = SemanticUNet.from_pretrained(unet_dir, torch_dtype=torch.float32)
    assert {p.dtype for p in unet32.parameters()} == {torch.float32}
    assert torch.equal(unet32.state_dict()[IMAGE_KEY], half[IMAGE_KEY].float())


def test_torch_dtype_bf16(parity_state):
    unet = SemanticUNet.from_pretrained(PARITY / "unet", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert not any(t.is_meta for t in unet.parameters())
    assert torch.equal(unet.state_dict()[IMAGE_KEY], parity_state[IMAGE_KEY].bfloat16())
    controlnet = SemanticControlNet.from_pretrained(PARITY / "controlnet", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in controlnet.parameters()} == {torch.bfloat16}
    assert not unet.training and not controlnet.training


@pytest.mark.parametrize("cls,sub", [(SemanticUNet, "unet"), (SemanticControlNet, "controlnet")])
def test_save_pretrained_round_trip(tmp_path, cls, sub):
    model = cls.from_pretrained(PARITY / sub)
    model.save_pretrained(tmp_path / sub)
    config = json.loads((tmp_path / sub / "config.json").read_text())
    assert config["use_image_cross_attention"] is True
    assert config["_class_name"] == cls.__name__
    assert (tmp_path / sub / WEIGHTS).is_file()
    again = cls.from_pretrained(tmp_path / sub)
    assert_same_state(again, model)
    # ...and the saved folder is still a strictly valid released-layout folder.
    assert set(load_file(str(tmp_path / sub / WEIGHTS))) == set(load_file(str(PARITY / sub / WEIGHTS)))


# ----------------------------------------------------------------------------- real-size key set


def parse_key_shapes(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """{section: {key: shape}} from `name: [d0, d1]` lines under `## Section ...` headers."""
    sections: dict[str, dict[str, tuple[int, ...]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("##"):
            current = line.lstrip("#").split()[0]
            sections[current] = {}
            continue
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([\w.]+)\s*:\s*\[([\d,\s]*)\]", line)
        assert match, f"unparsable line in {path}: {raw!r}"
        assert current is not None, f"key before any section in {path}: {raw!r}"
        name, dims = match.groups()
        assert name not in sections[current], f"duplicate key {name}"
        sections[current][name] = tuple(int(d) for d in dims.replace(",", " ").split())
    return sections


@pytest.fixture(scope="module")
def reference_keys():
    sections = parse_key_shapes(KEYS_TXT)
    assert set(sections) == {"UNet", "ControlNet"}
    return sections


def _image_attention_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if ".image_attentions." in k}


def test_real_size_unet_keys(reference_keys):
    with torch.device("meta"):
        unet = SemanticUNet(**SD2_UNET_CONFIG)
    state = unet.state_dict()
    assert all(t.is_meta for t in state.values())  # nothing real was allocated
    assert len(state) == 1102
    ours, ref = _image_attention_shapes(unet), reference_keys["UNet"]
    assert len(ref) == 416
    assert sorted(set(ours) - set(ref)) == [] and sorted(set(ref) - set(ours)) == []
    assert {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]} == {}
    assert ours["down_blocks.0.image_attentions.0.transformer_blocks.0.attn2.to_k.weight"] == (320, 512)
    assert ours["mid_block.image_attentions.0.transformer_blocks.0.attn2.to_v.weight"] == (1280, 512)
    # SD-2's own 686 tensors are untouched.
    assert len(state) - len(ours) == 686


def test_real_size_controlnet_keys(reference_keys):
    with torch.device("meta"):
        controlnet = SemanticControlNet(**SD2_CONTROLNET_CONFIG)
    ours, ref = _image_attention_shapes(controlnet), reference_keys["ControlNet"]
    assert len(ref) == 182
    assert sorted(set(ours) - set(ref)) == [] and sorted(set(ref) - set(ours)) == []
    assert {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]} == {}
    state = controlnet.state_dict()
    assert tuple(state["controlnet_cond_embedding.conv_out.weight"].shape) == (320, 256, 3, 3)
    assert tuple(state["controlnet_mid_block.weight"].shape) == (1280, 1280, 1, 1)


# ----------------------------------------------------------------------------- training setup


def test_set_trainable():
    unet = SemanticUNet.from_pretrained(PARITY / "unet")
    unet.set_trainable()
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in unet.named_parameters() if ".image_attentions." in n}
    assert len(trainable) == 416
    assert {id(p) for p in unet.image_attention_parameters()} == {
        id(p) for n, p in unet.named_parameters() if n in trainable
    }
    controlnet = SemanticControlNet.from_pretrained(PARITY / "controlnet")
    controlnet.requires_grad_(False)
    controlnet.set_trainable()
    assert all(p.requires_grad for p in controlnet.parameters())


def _grads(unet, v):
    unet.set_trainable()
    out = unet_forward(unet, v)
    weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_same_gradients(vectors, monkeypatch):
    plain = SemanticUNet.from_pretrained(PARITY / "unet", torch_dtype=torch.float32)
    out_ref, grads_ref = _grads(plain, vectors)

    calls = []
    real_checkpoint = semantic_blocks.checkpoint
    monkeypatch.setattr(
        semantic_blocks, "checkpoint", lambda *a, **kw: calls.append(1) or real_checkpoint(*a, **kw)
    )
    ckpt = SemanticUNet.from_pretrained(PARITY / "unet", torch_dtype=torch.float32)
    ckpt.enable_gradient_checkpointing()
    assert ckpt.is_gradient_checkpointing
    out, grads = _grads(ckpt, vectors)
    assert calls, "gradient checkpointing was enabled but never used"

    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=0)
    assert set(grads) == set(grads_ref) and len(grads) == 416
    assert grads_ref[IMAGE_KEY].abs().max() > 0
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=0, msg=name)

    # No grad -> no checkpointing, same output.
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(unet_forward(ckpt, vectors), out_ref, atol=1e-6, rtol=0)
    assert not calls
