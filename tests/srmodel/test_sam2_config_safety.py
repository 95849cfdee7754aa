"""A SAM2 yaml ships with the weights and may be hostile: it must not run code.

hydra's instantiate would call any importable ``_target_`` (shutil.copyfile,
builtins.open, ...); SemanticEncoder.from_config may only build the four sam2
image-encoder classes, each at its own place in ``model.image_encoder``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from srmodel.semantic.sam2_encoder import TINY_TEST_CONFIG, SemanticEncoder

REFUSED = "only sam2 image-encoder classes are allowed"


def _tiny_cfg() -> dict:
    return yaml.safe_load(Path(TINY_TEST_CONFIG).read_text())


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _refused(path: Path, side_effect: Path, *needles: str) -> str:
    with pytest.raises(Exception) as err:
        SemanticEncoder.from_config(path)
    assert not side_effect.exists()  # the hostile callable never ran
    assert err.type is ValueError, repr(err.value)
    msg = str(err.value)
    for needle in (str(path),) + needles:
        assert needle in msg, msg
    return msg


def test_copyfile_target_is_refused_not_run(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("tenant data")
    stolen = tmp_path / "stolen.txt"
    cfg = {"model": {"image_encoder": {
        "_target_": "shutil.copyfile", "src": str(secret), "dst": str(stolen)}}}
    # Before the allow-list, hydra's instantiate copied the file.
    _refused(_write(tmp_path, cfg), stolen, "model.image_encoder", "shutil.copyfile", REFUSED)


def test_nested_builtins_open_is_refused_not_run(tmp_path):
    pwned = tmp_path / "pwned"
    cfg = _tiny_cfg()
    cfg["model"]["image_encoder"]["trunk"] = {
        "_target_": "builtins.open", "file": str(pwned), "mode": "w"}
    _refused(_write(tmp_path, cfg), pwned, "model.image_encoder.trunk", "builtins.open", REFUSED)


def _open_node(pwned: Path) -> dict:
    return {"_target_": "builtins.open", "file": str(pwned), "mode": "w"}


@pytest.mark.parametrize(
    "case",
    ["in_list", "in_plain_dict", "allowed_class_wrong_place", "interpolated_node",
     "partial", "args_callable", "recursive_false", "convert", "hiera_weights_path"],
)
def test_other_tricks_are_refused(tmp_path, case):
    pwned = tmp_path / "pwned"
    cfg = _tiny_cfg()
    enc = cfg["model"]["image_encoder"]
    trunk, neck = enc["trunk"], enc["neck"]
    needle = "builtins.open"
    if case == "in_list":  # a _target_ hidden in a list value
        trunk["window_spec"] = [_open_node(pwned)]
        where = "model.image_encoder.trunk.window_spec.0"
    elif case == "in_plain_dict":  # ... or in a mapping without a _target_
        enc["extra"] = {"deep": _open_node(pwned)}
        where = "model.image_encoder.extra.deep"
    elif case == "allowed_class_wrong_place":  # sam2 class, but not where it belongs
        trunk["pos"] = dict(neck["position_encoding"])
        needle, where = "PositionEmbeddingSine", "model.image_encoder.trunk.pos"
    elif case == "interpolated_node":  # ${...} would splice an unchecked node in
        cfg["model"]["evil"] = _open_node(pwned)
        enc["trunk"] = "${model.evil}"
        needle, where = "${model.evil}", "model.image_encoder.trunk"
    elif case == "partial":
        trunk["_partial_"] = True
        needle, where = "_partial_", "model.image_encoder.trunk"
    elif case == "args_callable":
        enc["_args_"] = [_open_node(pwned)]
        needle, where = "_args_", "model.image_encoder"
    elif case == "recursive_false":
        enc["_recursive_"] = False
        needle, where = "_recursive_", "model.image_encoder"
    elif case == "convert":
        neck["_convert_"] = "none"
        needle, where = "_convert_", "model.image_encoder.neck"
    else:  # Hiera(weights_path=...) would torch.load a file the config names
        trunk["weights_path"] = str(tmp_path / "x.pt")
        needle, where = "weights_path", "model.image_encoder.trunk"
    _refused(_write(tmp_path, cfg), pwned, where, needle)


def test_image_size_interpolation_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("UGCSR_TEST_SECRET", "hunter2")
    cfg = _tiny_cfg()
    cfg["model"]["image_size"] = "${oc.env:UGCSR_TEST_SECRET}"
    msg = _refused(_write(tmp_path, cfg), tmp_path / "none", "model.image_size")
    assert "hunter2" not in msg


def test_released_sam2_configs_pass_the_allow_list():
    """Every image_encoder in the installed sam2 configs uses only allowed targets."""
    from omegaconf import OmegaConf

    from srmodel.semantic.sam2_encoder import _check_encoder_tree, _sam2_package_dir

    sam2_dir = _sam2_package_dir()
    assert sam2_dir is not None
    paths = sorted((sam2_dir / "configs").rglob("*.yaml")) + [Path(TINY_TEST_CONFIG)]
    assert len(paths) >= 9
    for path in paths:
        cfg = OmegaConf.load(path)
        model = cfg.get("model") or cfg.trainer.model  # training configs nest it
        _check_encoder_tree(OmegaConf.to_container(model.image_encoder), path)


def test_builder_matches_hydra_instantiate():
    """The hydra-free builder gives the same module as hydra did for the tiny config."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    ref = instantiate(OmegaConf.load(TINY_TEST_CONFIG).model.image_encoder, _convert_="all")
    ours = SemanticEncoder.from_config(TINY_TEST_CONFIG).image_encoder
    assert type(ours) is type(ref)
    assert repr(ours) == repr(ref)
    assert ours.trunk.channel_list == ref.trunk.channel_list
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert isinstance(ours.neck.backbone_channel_list, list)  # lists, as _convert_="all"
    assert torch.is_tensor(ours.trunk.pos_embed)
