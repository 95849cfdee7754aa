"""What SemanticUNet and SemanticControlNet share: strict loading, K/V folding, training setup."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from ..errors import WeightsError
from .strict_loading import load_strict, read_config, read_state_dict
from .image_attention import IMAGE_TOKEN_DIM, fold_image_kv


# Config keys diffusers' UNet/ControlNet honour but our block-level forward does not, with the
# values SD-2-base uses. Any other value would be silently ignored, so it is refused at load.
IGNORED_BY_FORWARD = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "time_embedding_act_fn": None,
    "time_cond_proj_dim": None,
    "center_input_sample": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
}


class SemanticModelMixin:
    """Mixed into a diffusers ModelMixin subclass that has image_attentions modules."""

    _base_class = None  # the diffusers class whose config keys we accept
    _class_names: tuple[str, ...] = ()
    image_token_dim = IMAGE_TOKEN_DIM

    @classmethod
    def _init_kwargs(cls, config: dict, source: str) -> dict:
        accepted = set(inspect.signature(cls._base_class.__init__).parameters) - {"self"}
        accepted.add("use_image_cross_attention")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in accepted)
        if unknown:
            raise WeightsError(
                f"{source} has config keys this diffusers version does not know: {unknown}; "
                "upgrade diffusers or remove them if they are not used"
            )
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        ignored = {k: v for k, v in kwargs.items() if k in IGNORED_BY_FORWARD and v != IGNORED_BY_FORWARD[k]}
        if ignored:
            raise WeightsError(
                f"{source} sets {ignored}: {cls.__name__}'s forward does not implement these (SD-2-base and the "
                f"release leave them at {', '.join(f'{k}={IGNORED_BY_FORWARD[k]!r}' for k in ignored)}), so this "
                "model would run without them; use a folder of the released architecture"
            )
        if kwargs.get("use_image_cross_attention") is False:
            raise WeightsError(f"{source} sets use_image_cross_attention=false: this is not a SeeSR/SAM2 model folder")
        return kwargs

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        fold_kv: bool = False,
    ):
        """Load a released (or save_pretrained) folder strictly.

        Missing, unexpected or mis-shaped keys raise WeightsError listing them.
        `fold_kv` folds the 512-wide image K/V to 256 after loading.
        """
        folder = Path(folder) / subfolder if subfolder else Path(folder)
        config = read_config(folder, cls._class_names)
        kwargs = cls._init_kwargs(config, str(folder / "config.json"))
        state, source = read_state_dict(folder)
        # Fold in float32, then cast: folding after a cast to fp16 would round the halves first.
        fold_first = fold_kv and torch_dtype in (torch.float16, torch.bfloat16)
        model = load_strict(
            lambda: cls(**kwargs),
            state,
            source,
            dtype=torch.float32 if fold_first else torch_dtype,
            device=device,
            hint=f"expected a {cls.__name__} folder as released in checkpoint-90000/ (with image_attentions)",
        )
        if fold_kv:
            model.fold_image_kv_()
        if fold_first:
            model = model.to(torch_dtype)
        return model

    def fold_image_kv_(self):
        if self.image_token_dim != IMAGE_TOKEN_DIM:
            return self
        fold_image_kv(self)
        self.image_token_dim = IMAGE_TOKEN_DIM // 2
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self.image_token_dim != IMAGE_TOKEN_DIM:
            raise ValueError(
                "this model's image K/V weights are folded to 256 and cannot be saved in the released "
                "layout; save before calling fold_image_kv_()"
            )
        return super().save_pretrained(save_directory, *args, **kwargs)

    def image_attention_parameters(self):
        return [p for n, p in self.named_parameters() if ".image_attentions." in n]
