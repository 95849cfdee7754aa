"""What trains and what stays frozen, built from a ModelConfig (METHOD.md section 3.1)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from torch import nn

from ..config import ModelConfig
from ..models.controlnet import SemanticControlNet
from ..sampling.ddpm import make_scheduler
from ..errors import WeightsError
from ..models.strict_loading import load_strict, read_config, read_state_dict
from ..semantic.sam2_encoder import SemanticEncoder
from ..models.text_encoder import TextConditioner
from ..models.unet import SemanticUNet
from .config import TrainRecipe

IMAGE_ATTN = ".image_attentions."


def is_trainable(name: str) -> bool:
    """The release's split: every ControlNet parameter and every UNet image_attentions parameter."""
    return name.startswith("controlnet.") or (name.startswith("unet.") and IMAGE_ATTN in name)


class SRTrainModel(nn.Module):
    """ControlNet + UNet as one module, so DDP wraps (and all-reduces) the trainable part in one go.

    Trained unfolded (K/V 512 wide): folding would change what Adam sees per weight and a
    folded model cannot be saved in the released layout.
    """

    def __init__(self, unet: SemanticUNet, controlnet: SemanticControlNet):
        super().__init__()
        if unet.image_token_dim != 512 or controlnet.image_token_dim != 512:
            raise ValueError("train unfolded models: load them with fold_kv=False")
        self.unet, self.controlnet = unet, controlnet
        self.set_trainable_split()

    def set_trainable_split(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(is_trainable(name))

    def train(self, mode: bool = True):
        # Frozen UNet layers stay in inference mode; only the trained modules follow `mode`.
        super().train(mode)
        self.unet.eval()
        for name, module in self.unet.named_modules():
            if name.split(".")[-1] == "image_attentions":
                module.train(mode)
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        self.controlnet.enable_gradient_checkpointing()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in sorted(self.named_parameters()) if p.requires_grad]

    def forward(self, noisy, timesteps, text, cond, tokens):
        down, mid = self.controlnet(noisy, timesteps, encoder_hidden_states=text, controlnet_cond=cond,
                                    image_encoder_hidden_states=tokens, return_dict=False)
        return self.unet(noisy, timesteps, text, tokens, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


def trainable_state_dict(model: SRTrainModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if is_trainable(n)}


def load_trainable_state(model: SRTrainModel, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict: exactly the trainable keys, with their shapes."""
    params = dict(model.named_parameters())
    expected = {n for n in params if is_trainable(n)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    bad = [n for n in expected & set(state) if tuple(state[n].shape) != tuple(params[n].shape)]
    if missing or unexpected or bad:
        raise WeightsError(f"{source}: trainable weights do not match the model: missing {missing[:5]} "
                           f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), mis-shaped {bad[:5]}")
    with torch.no_grad():
        for n in expected:
            params[n].copy_(state[n].to(params[n].dtype))


def load_unet(config: ModelConfig, init: str, *, seesr_init: str | None = None, device=None) -> SemanticUNet:
    """`released`: the checkpoint's unet/. `paper`: SD-2-base UNet weights + `seesr_init`'s image_attentions.

    The paper start is what the authors' `from_pretrained_orig` did (METHOD.md 3.1): the SD
    weights come from stable-diffusion-2-base/unet, only `image_attentions` keys from the public
    SeeSR checkpoint (whose image_attentions were trained on RAM embeddings; SAM tokens duplicated to
    512 channels fit them). Loaded strictly: a SeeSR folder without those keys is an error, where
    the authors' `strict=False` would have left them random.
    """
    src = config.source
    if init == "released":
        return SemanticUNet.from_pretrained(src.seesr, subfolder="unet", torch_dtype=torch.float32, device=device)
    if not seesr_init:
        raise ValueError("init=paper needs seesr_init: the public SeeSR checkpoint folder (unet/ + controlnet/)")
    seesr = Path(seesr_init) / "unet"
    sd = Path(src.sd_base) / "unet"
    if not sd.is_dir():
        raise FileNotFoundError(f"init=paper needs the SD-2-base UNet at {sd} (stabilityai/stable-diffusion-2-base unet/)")
    cfg = read_config(seesr, SemanticUNet._class_names)
    kwargs = SemanticUNet._init_kwargs(cfg, str(seesr / "config.json"))
    base, base_src = read_state_dict(sd)
    semantic, sem_src = read_state_dict(seesr)
    if any(IMAGE_ATTN in k for k in base):
        raise WeightsError(f"{base_src} already has image_attentions: expected the plain SD-2-base UNet")
    state = {**base, **{k: v for k, v in semantic.items() if IMAGE_ATTN in k}}
    return load_strict(lambda: SemanticUNet(**kwargs), state, f"{base_src} + image_attentions of {sem_src}",
                       dtype=torch.float32, device=device)


def load_controlnet(config: ModelConfig, recipe: TrainRecipe) -> SemanticControlNet:
    """The ControlNet training starts from: the checkpoint's (released) or the public SeeSR one's (paper)."""
    folder = recipe.seesr_init if recipe.init == "paper" else config.source.seesr
    return SemanticControlNet.from_pretrained(folder, subfolder="controlnet", torch_dtype=torch.float32)


@dataclass
class TrainParts:
    """The trainable module and the frozen helpers the loss needs."""

    model: SRTrainModel
    vae: AutoencoderKL
    text: TextConditioner
    encoder: SemanticEncoder
    scheduler: DDPMScheduler
    null_ids: torch.Tensor  # (77,) ids of the empty prompt
    config: ModelConfig


def load_train_parts(config: ModelConfig, recipe: TrainRecipe, device="cpu") -> TrainParts:
    """Trainable weights fp32; frozen parts (and frozen UNet layers) in the recipe's frozen dtype."""
    if config.source is None:
        raise ValueError("resolve the model config first (srmodel.stages.resolve)")
    src = config.source
    unet = load_unet(config, recipe.init, seesr_init=recipe.seesr_init)
    controlnet = load_controlnet(config, recipe)
    vae = AutoencoderKL.from_pretrained(Path(src.sd_base) / "vae")
    text = TextConditioner.from_pretrained(src.sd_base)
    encoder = SemanticEncoder.from_pretrained(src.sam2_checkpoint, src.sam2_config)
    return assemble_train_parts(unet, controlnet, vae, text, encoder, make_scheduler(src.sd_base), config, recipe, device)


def assemble_train_parts(unet, controlnet, vae, text, encoder, scheduler, config, recipe, device="cpu") -> TrainParts:
    """Split, cast and place already built parts (the loader above, or random real-size ones in benchmarks)."""
    device = torch.device(device)
    frozen = recipe.frozen_torch_dtype(device)
    model = SRTrainModel(unet, controlnet)
    if frozen != torch.float32:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(frozen)
    if recipe.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device).train()
    if vae.dtype != frozen:  # (diffusers warns on any dtype cast, even a no-op one)
        vae = vae.to(dtype=frozen)
    vae = vae.to(device).eval().requires_grad_(False)
    text = TextConditioner(text.tokenizer, text.text_encoder.to(device, frozen))
    encoder = encoder.to(device, frozen).eval().requires_grad_(False)
    tok = text.tokenizer
    null_ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids[0]
    return TrainParts(model, vae, text, encoder, scheduler, null_ids, config)


def export_pretrained(config: ModelConfig, recipe: TrainRecipe, trainable: dict[str, torch.Tensor], out: str | Path) -> Path:
    """The released layout out/{unet,controlnet} (safetensors, unfolded) from a trainable state."""
    out = Path(out)
    model = SRTrainModel(load_unet(config, recipe.init, seesr_init=recipe.seesr_init), load_controlnet(config, recipe))
    load_trainable_state(model, trainable)
    model.unet.save_pretrained(out / "unet", safe_serialization=True)
    model.controlnet.save_pretrained(out / "controlnet", safe_serialization=True)
    return out
