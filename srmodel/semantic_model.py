"""What SemanticUNet and SemanticControlNet share: strict loading, K/V folding, training setup."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .errors import WeightsError
from .loading import load_strict, read_config, read_state_dict
from .semantic_blocks import IMAGE_TOKEN_DIM, fold_image_kv


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
        model = load_strict(
            lambda: cls(**kwargs),
            state,
            source,
            dtype=torch_dtype,
            device=device,
            hint=f"expected a {cls.__name__} folder as released in checkpoint-90000/ (with image_attentions)",
        )
        if fold_kv:
            model.fold_image_kv_()
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
