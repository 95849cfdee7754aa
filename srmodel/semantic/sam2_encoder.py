"""Semantic tokens from the SAM 2.1 image encoder (Hiera trunk + FPN neck).

This re-implements the authors' ``generate_image_embedding`` from "Enhanced Semantic
Extraction and Guidance for UGC Image SR" (SeeSR + SAM2), keeping only the image path
of SAM 2.1:

1. uint8 RGB HWC image -> float [0, 1] CHW -> resize to ``(image_size, image_size)``
   (1024 x 1024 for the real model) with bilinear interpolation, aspect ratio NOT
   preserved, no antialias (the torchvision 0.15 tensor default the authors ran)
   -> ImageNet normalisation (mean 0.485/0.456/0.406, std 0.229/0.224/0.225).
2. ``image_encoder(x)["vision_features"]``: the stride-16 FPN level (the yaml's
   ``scalp: 1`` drops the stride-32 one), ``(B, 256, 64, 64)`` at 1024 input.
3. Flattened to tokens ``(B, H*W, 256)`` and the learned ``no_mem_embed`` (1, 1, 256)
   is added to every token (the config's ``directly_add_no_mem_embed: true``).
   No positional encoding is added.

So the real SAM 2.1 Hiera-Tiny at 1024 input gives **4096 tokens of width 256** per
image (``(B, 4096, 256)``, about 2 MiB per image in fp16). The authors concatenate the
tokens with themselves to 512 channels before the diffusion model's cross-attention;
we keep them 256 wide and provide :func:`widen_tokens` for that step.

Memory: :meth:`SemanticEncoder.encode` runs under ``torch.inference_mode()``; the
authors' code kept an autograd graph through the encoder, which changes nothing in
the values but costs memory.

Public API::

    SemanticEncoder.from_config(config) -> SemanticEncoder            # random init
    SemanticEncoder.from_pretrained(checkpoint, config=DEFAULT_CONFIG, *,
                                    device="cpu", dtype=torch.float32)
    SemanticEncoder.preprocess(images) -> Tensor (B, 3, S, S)
    SemanticEncoder.forward(pixel_values) -> Tensor (B, N, d)
    SemanticEncoder.encode(images) -> Tensor (B, N, d)
    widen_tokens(tokens) -> Tensor (..., 2 * d)
    save_sam2_checkpoint(encoder, path, *, extra_keys=True) -> Path
    resolve_config(config) -> Path
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsError, describe_key_problems

__all__ = [
    "DEFAULT_CONFIG",
    "TINY_TEST_CONFIG",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SemanticEncoder",
    "WeightsError",
    "resolve_config",
    "save_sam2_checkpoint",
    "widen_tokens",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The sam2 package config of SAM 2.1 Hiera-Tiny (the authors' model).
DEFAULT_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
#: Tiny random config shipped with srmodel for tests and the `tiny` preset.
TINY_TEST_CONFIG = str(Path(__file__).resolve().parent / "configs" / "sam2.1_hiera_tiny_test.yaml")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ENCODER_PREFIX = "image_encoder."
_NO_MEM_EMBED = "no_mem_embed"
_CHECKPOINT_HINT = (
    "expected the official SAM 2.1 checkpoint matching the config (sam2.1_hiera_tiny.pt "
    "for configs/sam2.1/sam2.1_hiera_t.yaml), i.e. a torch file {'model': state_dict} "
    "with image_encoder.* and no_mem_embed keys; pass the config the checkpoint was "
    "trained with, or re-download the checkpoint."
)


# --------------------------------------------------------------------------- config


def _sam2_package_dir() -> Path | None:
    spec = importlib.util.find_spec("sam2")
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    return None


def resolve_config(config: PathLike) -> Path:
    """Find a SAM2 hydra yaml.

    ``config`` is a path to a yaml file, or the name of a sam2 package config such as
    ``"configs/sam2.1/sam2.1_hiera_t.yaml"`` or ``"sam2.1_hiera_t.yaml"`` (looked up in
    the installed sam2 package), or the name of a config shipped in ``srmodel/semantic/configs``
    (e.g. ``"sam2.1_hiera_tiny_test.yaml"``). The ``.yaml`` suffix may be omitted.
    Raises FileNotFoundError listing every place tried.
    """
    raw = os.fspath(config)
    names = [raw] if raw.endswith((".yaml", ".yml")) else [raw, raw + ".yaml"]
    candidates: list[Path] = []
    sam2_dir = _sam2_package_dir()
    own_dir = Path(__file__).resolve().parent / "configs"
    for name in names:
        given = Path(name).expanduser()
        candidates.append(given)
        if given.is_absolute():
            continue
        base = Path(name).name
        if sam2_dir is not None:
            candidates.append(sam2_dir / name)
        candidates.append(own_dir / name)
        candidates.append(own_dir / base)
        if sam2_dir is not None:
            candidates += [
                sam2_dir / "configs" / name,
                sam2_dir / "configs" / "sam2.1" / base,
                sam2_dir / "configs" / "sam2" / base,
            ]
    seen: list[Path] = []
    for cand in candidates:
        if cand in seen:
            continue
        seen.append(cand)
        if cand.is_file():
            return cand
    where = "" if sam2_dir is not None else " (the sam2 package is not installed)"
    tried = "\n".join(f"  {p}" for p in seen)
    raise FileNotFoundError(
        f"SAM2 config {raw!r} not found{where}; tried:\n{tried}\n"
        "Pass a path to a yaml file or a sam2 package config name such as "
        f"{DEFAULT_CONFIG!r}."
    )


def _load_image_encoder_config(path: Path) -> tuple[Any, int]:
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.load(path)
    model = cfg.get("model") if isinstance(cfg, DictConfig) else None
    enc = model.get("image_encoder") if isinstance(model, DictConfig) else None
    if not isinstance(enc, DictConfig) or "_target_" not in enc:
        raise ValueError(
            f"SAM2 config {path} has no model.image_encoder node with a _target_; "
            "expected a sam2 hydra config like configs/sam2.1/sam2.1_hiera_t.yaml."
        )
    if OmegaConf.is_interpolation(model, "image_size"):
        # Resolving it could read the environment (oc.env) into an error message.
        raise ValueError(
            f"refusing SAM2 config {path}: model.image_size must be a plain number, "
            "not an interpolation."
        )
    image_size = int(model.get("image_size", 1024) or 1024)
    return enc, image_size


# The yaml ships with the weights and may come from a user or another tenant, so it is
# data, not code: hydra's instantiate would call any importable ``_target_`` (e.g.
# shutil.copyfile, builtins.open). We build the image encoder ourselves and allow only
# the sam2 classes the released configs use, each at its own place in the tree.
_ENCODER_TARGETS: dict[tuple[str, ...], str] = {
    (): "sam2.modeling.backbones.image_encoder.ImageEncoder",
    ("trunk",): "sam2.modeling.backbones.hieradet.Hiera",
    ("neck",): "sam2.modeling.backbones.image_encoder.FpnNeck",
    ("neck", "position_encoding"): "sam2.modeling.position_encoding.PositionEmbeddingSine",
}
# Arguments refused even on allowed classes: Hiera(weights_path=...) torch.loads a file
# the config names (a pickle), which no released config uses.
_REFUSED_KWARGS = {"sam2.modeling.backbones.hieradet.Hiera": {"weights_path"}}
_ALLOWED_MSG = (
    "only sam2 image-encoder classes are allowed (ImageEncoder at model.image_encoder, "
    "Hiera at .trunk, FpnNeck at .neck, PositionEmbeddingSine at .neck.position_encoding), "
    "with plain values as arguments; the config is not trusted to run code"
)


def _where(keys: tuple[str, ...]) -> str:
    return ".".join(("model", "image_encoder") + keys)


def _check_encoder_tree(node: Any, path: PathLike, keys: tuple[str, ...] = ()) -> None:
    """Raise ValueError unless ``node`` (plain containers of ``model.image_encoder``,
    interpolations unresolved) only names allowed targets at their places."""
    if isinstance(node, str) and "${" in node:
        # An interpolation could splice in an unchecked node or read the environment.
        raise ValueError(
            f"refusing SAM2 config {path}: {_where(keys)} is the interpolation {node!r}; "
            f"interpolations are not allowed in model.image_encoder; {_ALLOWED_MSG}."
        )
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_encoder_tree(item, path, keys + (str(i),))
        return
    if not isinstance(node, dict):
        return
    for key in node:
        name = str(key)
        if name != "_target_" and name.startswith("_") and name.endswith("_"):
            # hydra options (_partial_, _args_, _recursive_, _convert_, ...) change what
            # gets called; our builder has no such options.
            raise ValueError(
                f"refusing SAM2 config {path}: {_where(keys)} sets the hydra option "
                f"{name}; {_ALLOWED_MSG}."
            )
    allowed = _ENCODER_TARGETS.get(keys)
    if "_target_" in node:
        target = node["_target_"]
        if target != allowed:
            expected = f"expected {allowed}" if allowed else "no _target_ is allowed here"
            raise ValueError(
                f"refusing SAM2 config {path}: {_where(keys)} has _target_ {target!r} "
                f"({expected}); {_ALLOWED_MSG}."
            )
        bad = sorted(_REFUSED_KWARGS.get(target, set()) & set(map(str, node)))
        if bad:
            raise ValueError(
                f"refusing SAM2 config {path}: {_where(keys)} sets {', '.join(bad)} on "
                f"{target}, which would load a file named by the config; {_ALLOWED_MSG}."
            )
    elif not keys:
        raise ValueError(
            f"refusing SAM2 config {path}: model.image_encoder has no _target_; "
            f"expected {allowed}."
        )
    for key, value in node.items():
        if key != "_target_":
            _check_encoder_tree(value, path, keys + (str(key),))


def _build_encoder_node(node: Any, path: PathLike, keys: tuple[str, ...] = ()) -> Any:
    """Build a tree already passed by :func:`_check_encoder_tree` (children first, as
    hydra's instantiate with ``_convert_="all"`` does; plain lists and dicts stay so)."""
    if isinstance(node, list):
        return [_build_encoder_node(v, path, keys + (str(i),)) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    kwargs = {
        k: _build_encoder_node(v, path, keys + (str(k),))
        for k, v in node.items()
        if k != "_target_"
    }
    if "_target_" not in node:
        return kwargs
    target = node["_target_"]
    if target != _ENCODER_TARGETS.get(keys):  # checked already; never import anything else
        raise ValueError(f"refusing SAM2 config {path}: {_where(keys)}; {_ALLOWED_MSG}.")
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ValueError(
            f"SAM2 config {path}: building {_where(keys)} ({target}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _build_image_encoder(enc_cfg: Any, path: PathLike) -> nn.Module:
    """Check the whole ``model.image_encoder`` tree against the allow-list, then build
    it without hydra (so hydra is not in the trust path)."""
    from omegaconf import OmegaConf

    # resolve=False: interpolations are refused, never evaluated.
    tree = OmegaConf.to_container(enc_cfg, resolve=False)
    _check_encoder_tree(tree, path)
    return _build_encoder_node(tree, path)


# --------------------------------------------------------------------------- module


class SemanticEncoder(nn.Module):
    """The SAM 2.1 image path that turns images into semantic tokens.

    Holds only ``image_encoder`` (sam2's ``ImageEncoder``: Hiera trunk + FPN neck) and
    the learned ``no_mem_embed`` (1, 1, d); its ``state_dict`` keys are named exactly as
    in the official SAM2 checkpoints (``image_encoder.*``, ``no_mem_embed``).

    ``forward`` returns ``(B, N, d)`` tokens with ``N = (image_size / 16) ** 2``:
    ``(B, 4096, 256)`` for the real SAM 2.1 Hiera-Tiny at 1024 x 1024 input,
    ``(B, 256, 256)`` for the tiny test config at 256 x 256.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        *,
        image_size: int = 1024,
        config_path: str | None = None,
    ) -> None:
        super().__init__()
        neck = getattr(image_encoder, "neck", None)
        d_model = getattr(neck, "d_model", None)
        if not isinstance(d_model, int):
            raise TypeError(
                "image_encoder must be a sam2 ImageEncoder whose neck has an int d_model, "
                f"got {type(image_encoder).__name__}"
            )
        self.image_encoder = image_encoder
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, d_model))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)  # as SAM2Base
        self.image_size = int(image_size)
        self.config_path = config_path

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, config: PathLike = DEFAULT_CONFIG) -> "SemanticEncoder":
        """Random-init encoder from a sam2 hydra yaml (see :func:`resolve_config`).

        Only ``model.image_encoder`` and ``model.image_size`` (default 1024) are read;
        the rest of SAM2 is not built. The yaml is treated as untrusted data: the
        encoder is built without hydra, and only the sam2 classes ImageEncoder, Hiera,
        FpnNeck and PositionEmbeddingSine, each at its place in the released configs,
        may be named by ``_target_``; anything else (other targets, hydra options such
        as ``_partial_``/``_args_``, interpolations, Hiera's ``weights_path``) raises
        ValueError before anything is built.
        """
        path = resolve_config(config)
        enc_cfg, image_size = _load_image_encoder_config(path)
        image_encoder = _build_image_encoder(enc_cfg, path)
        if not isinstance(image_encoder, nn.Module):
            raise ValueError(
                f"model.image_encoder in {path} built a {type(image_encoder).__name__}, "
                "not a torch module"
            )
        return cls(image_encoder, image_size=image_size, config_path=str(path))

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: PathLike,
        config: PathLike = DEFAULT_CONFIG,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "SemanticEncoder":
        """Build from ``config`` and load an official SAM2 checkpoint.

        ``checkpoint`` is a torch file holding ``{"model": state_dict}`` (the official
        ``sam2.1_hiera_tiny.pt`` format) or a bare state dict. It is read with
        ``weights_only=True``. Only ``image_encoder.*`` and ``no_mem_embed`` are used;
        the other SAM2 heads (memory attention/encoder, mask decoder, prompt encoder,
        object pointers, ...) are ignored. Loading is strict: missing keys, unexpected
        ``image_encoder.*`` keys and shape mismatches raise :class:`WeightsError`.

        Returns the encoder in eval mode with ``requires_grad=False`` on ``device`` /
        ``dtype``.
        """
        ckpt_path = Path(os.fspath(checkpoint)).expanduser()
        state = _read_state_dict(ckpt_path)
        model = cls.from_config(config)
        wanted = {
            k: v
            for k, v in state.items()
            if k.startswith(_ENCODER_PREFIX) or k == _NO_MEM_EMBED
        }
        expected = model.state_dict()
        missing = [k for k in expected if k not in wanted]
        unexpected = [k for k in wanted if k not in expected]
        mismatched = [
            (k, tuple(wanted[k].shape), tuple(expected[k].shape))
            for k in expected
            if k in wanted and tuple(wanted[k].shape) != tuple(expected[k].shape)
        ]
        if missing or unexpected or mismatched:
            hint = _CHECKPOINT_HINT + f" (config: {model.config_path})"
            if not wanted:
                hint = (
                    "the file has no image_encoder.* / no_mem_embed keys at all. " + hint
                )
            raise WeightsError(
                describe_key_problems(
                    str(ckpt_path),
                    missing=missing,
                    unexpected=unexpected,
                    mismatched=mismatched,
                    hint=hint,
                )
            )
        model.load_state_dict(wanted, strict=True)
        model.requires_grad_(False)
        model.eval()
        return model.to(device=device, dtype=dtype)

    # ---------------------------------------------------------------- properties

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.no_mem_embed.dtype

    @property
    def d_model(self) -> int:
        return int(self.no_mem_embed.shape[-1])

    @property
    def feature_stride(self) -> int:
        """Pixel stride of ``vision_features`` (16 for the SAM 2.1 configs)."""
        trunk = self.image_encoder.trunk
        level = len(trunk.channel_list) - 1 - int(self.image_encoder.scalp)
        end = trunk.stage_ends[level]
        pools = sum(1 for b in trunk.q_pool_blocks if b <= end)
        patch = trunk.patch_embed.proj.stride[0]
        return int(patch * trunk.q_stride[0] ** pools)

    @property
    def token_grid(self) -> int:
        """Side of the token grid: 64 for the real model (1024 / 16), 16 for tiny."""
        return self.image_size // self.feature_stride

    @property
    def num_tokens(self) -> int:
        """Tokens per image: 4096 for the real model at 1024 input, 256 for tiny."""
        return self.token_grid**2

    # ---------------------------------------------------------------- inference

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images -> normalised ``(B, 3, S, S)`` pixels, S = ``image_size``.

        ``images`` is a list of uint8 RGB ``H x W x 3`` numpy arrays (any sizes; each is
        resized independently; PIL images are accepted too), a single such array, a
        ``B x H x W x 3`` uint8 array, or a tensor batch ``(B, 3, H, W)`` /
        ``(B, H, W, 3)`` (or one image without B) that is uint8 in [0, 255] or float in
        [0, 1]. Resize is bilinear, align_corners=False, no antialias, aspect ratio not
        preserved; then ImageNet normalisation. The work is done in float32 on the
        module's device and the result is cast to the module's dtype.
        """
        size = (self.image_size, self.image_size)
        device = self.device
        if isinstance(images, torch.Tensor) or (
            isinstance(images, np.ndarray) and images.ndim == 4
        ):
            batch = _batch_to_bchw(images, device)
            x = _resize(batch, size)
        else:
            if isinstance(images, np.ndarray) or _is_pil(images):
                images = [images]
            if not isinstance(images, Sequence) or len(images) == 0:
                raise ValueError(
                    "preprocess expects a non-empty list of H x W x 3 uint8 RGB images "
                    f"or an image tensor batch, got {type(images).__name__}"
                )
            x = torch.cat(
                [_resize(_image_to_bchw(img, i, device), size) for i, img in enumerate(images)]
            )
        mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        x = (x - mean) / std
        return x.to(self.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, S, S)`` pixels -> tokens ``(B, N, d)`` in the module dtype.

        tokens = flatten(image_encoder(x)["vision_features"]) + no_mem_embed; no
        positional encoding. N = (S / 16) ** 2: 4096 tokens of width 256 for the real
        SAM 2.1 Hiera-Tiny at S = 1024.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        feats = self.image_encoder(x)["vision_features"]  # (B, d, H/16, W/16)
        tokens = feats.flatten(2).transpose(1, 2)  # (B, H*W/256, d)
        # The FPN neck upsamples in float32, so cast back to the module dtype.
        return (tokens + self.no_mem_embed).to(self.dtype)

    def encode(self, images: Any) -> torch.Tensor:
        """``preprocess`` + ``forward`` without autograd: ``(B, N, d)`` tokens.

        Runs under ``torch.inference_mode()``; the result is cloned out of inference
        mode (a cheap copy, ~2 MiB per image in fp16) so it can be used as an ordinary
        tensor afterwards, e.g. as cross-attention input in autograd-enabled code.
        """
        with torch.inference_mode():
            tokens = self.forward(self.preprocess(images))
        return tokens.clone()


def widen_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """The authors' 512-channel tokens: ``torch.cat([t, t], -1)`` ((B, N, d) -> (B, N, 2d))."""
    return torch.cat([tokens, tokens], dim=-1)


# --------------------------------------------------------------------------- checkpoints


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"SAM2 checkpoint not found: {path}")
    if path.is_dir():
        raise WeightsError(
            f"SAM2 checkpoint {path} is a directory; {_CHECKPOINT_HINT}"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        first = text.strip().splitlines()[0] if text.strip() else ""
        if "weights only load failed" in text.lower():
            why = (
                "it holds Python objects other than tensors, which are refused "
                "(loaded with weights_only=True; never unpickle untrusted files)"
            )
        else:
            why = f"it is not a readable torch checkpoint ({type(exc).__name__}: {first})"
        raise WeightsError(f"cannot load {path}: {why}.\n  {_CHECKPOINT_HINT}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"{path} holds a {type(obj).__name__}, not a state dict; {_CHECKPOINT_HINT}"
        )
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"{path} holds no tensors; {_CHECKPOINT_HINT}")
    return state


#: Real key names of SAM2 parts the image path does not use (written as small junk
#: tensors by save_sam2_checkpoint so loaders are exercised on the filtering).
_JUNK_KEYS: dict[str, tuple[int, ...]] = {
    "sam_mask_decoder.conv_s0.weight": (4, 4, 1, 1),
    "sam_prompt_encoder.not_a_point_embed.weight": (1, 4),
    "memory_encoder.out_proj.weight": (4, 4, 1, 1),
    "memory_attention.layers.0.linear1.weight": (4, 4),
    "obj_ptr_proj.layers.0.weight": (4, 4),
    "obj_ptr_tpos_proj.weight": (4, 4),
    "mask_downsample.weight": (1, 1, 4, 4),
    "maskmem_tpos_enc": (7, 1, 1, 4),
    "no_mem_pos_enc": (1, 1, 4),
    "no_obj_ptr": (1, 4),
    "no_obj_embed_spatial": (1, 4),
}


def save_sam2_checkpoint(
    encoder: SemanticEncoder, path: PathLike, *, extra_keys: bool = True
) -> Path:
    """Write ``encoder`` in the official SAM2 checkpoint format ``{"model": state_dict}``.

    Keys are named as in the real file (``image_encoder.*``, ``no_mem_embed``); with
    ``extra_keys`` a few small junk tensors named like the unused SAM2 heads
    (``sam_mask_decoder.*``, ``memory_encoder.*``, ``obj_ptr_proj.*``,
    ``maskmem_tpos_enc``, ...) are added. Tensors are saved on CPU in the encoder's
    dtype. The file is written atomically (temp file + rename). Returns the path.
    """
    out = Path(os.fspath(path)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").clone() for k, v in encoder.state_dict().items()}
    if extra_keys:
        gen = torch.Generator().manual_seed(0)
        for key, shape in _JUNK_KEYS.items():
            state[key] = torch.randn(shape, generator=gen)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"model": state}, tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


# --------------------------------------------------------------------------- helpers


def _is_pil(obj: Any) -> bool:
    return type(obj).__module__.startswith("PIL.")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)


def _to_unit_float(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return t.to(torch.float32) / 255.0
    if t.is_floating_point():
        return t.to(torch.float32)
    raise ValueError(f"{what} must be uint8 (0..255) or float (0..1), got {t.dtype}")


def _image_to_bchw(img: Any, index: int, device: torch.device) -> torch.Tensor:
    what = f"image {index}"
    if _is_pil(img):
        img = np.asarray(img.convert("RGB"))
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"{what} must be an H x W x 3 RGB array, got shape {img.shape}")
        if img.dtype != np.uint8:
            raise ValueError(f"{what} must be uint8 RGB, got dtype {img.dtype}")
        t = torch.from_numpy(np.array(img, copy=not img.flags.writeable, order="C")).to(device).permute(2, 0, 1)
        return _to_unit_float(t, what).unsqueeze(0)
    if isinstance(img, torch.Tensor):
        return _batch_to_bchw(img, device, what)
    raise ValueError(f"{what} must be a uint8 H x W x 3 numpy array, got {type(img).__name__}")


def _batch_to_bchw(batch: Any, device: torch.device, what: str = "images") -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise ValueError(f"{what} must be (B, 3, H, W) or (B, H, W, 3), got {tuple(t.shape)}")
    if isinstance(batch, np.ndarray) or (t.shape[1] != 3 and t.shape[-1] == 3):
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] != 3:
        raise ValueError(f"{what} must have 3 RGB channels, got shape {tuple(t.shape)}")
    return _to_unit_float(t.to(device), what)
