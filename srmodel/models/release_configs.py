"""The released parts' real configs, builders for them, and their released parameter counts.

The configs are written as the released folders hold them: stabilityai/stable-diffusion-2-base's
unet/, vae/, text_encoder/, tokenizer/ and scheduler/ config files (as far as known here, nothing
can be downloaded), and checkpoint-90000's unet/ and controlnet/ configs as METHOD.md §5 describes
them (SD-2-base's config + "use_image_cross_attention": true). `python -m srmodel.tiny DIR --size
real` writes random weights from these; tests build each part on the `meta` device and compare
its count with RELEASED_PARAMS.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

_CROSS = "CrossAttnDownBlock2D"
# stabilityai/stable-diffusion-2-base unet/config.json (diffusers 0.10 era keys).
SD2_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.10.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": [_CROSS, _CROSS, _CROSS, "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}
# checkpoint-90000/unet/config.json: SD-2-base's + the flag SeeSR's from_pretrained_orig writes (METHOD.md §1.2).
RELEASE_UNET_CONFIG = dict(SD2_UNET_CONFIG, _diffusers_version="0.21.4", use_image_cross_attention=True)
# checkpoint-90000/controlnet/config.json: ControlNetModel.from_unet(SD-2-base) as diffusers 0.21 saves it, plus
# SeeSR's flag. Expected values (METHOD.md §5), not read from the file.
_SHARED = ("act_fn", "attention_head_dim", "block_out_channels", "cross_attention_dim", "down_block_types",
           "downsample_padding", "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block",
           "mid_block_scale_factor", "norm_eps", "norm_num_groups", "use_linear_projection")
RELEASE_CONTROLNET_CONFIG = {
    "_class_name": "ControlNetModel",
    "_diffusers_version": "0.21.4",
    **{k: SD2_UNET_CONFIG[k] for k in _SHARED},
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "class_embed_type": None,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "global_pool_conditions": False,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": 1,
    "upcast_attention": False,
    "use_image_cross_attention": True,
}
# stable-diffusion-2-base vae/config.json; scaling_factor is diffusers' default, written out.
SD2_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.10.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# stable-diffusion-2-base text_encoder/config.json: the OpenCLIP ViT-H/14 text tower (its last layer dropped: 23 of 24).
# Its bos/eos/pad ids (0, 2, 1) are as shipped, not the tokenizer's; they only touch the pooled output.
SD2_TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "torch_dtype": "float32",
    "transformers_version": "4.25.0.dev0",
    "vocab_size": 49408,
}
# stable-diffusion-2-base tokenizer/: CLIP's BPE (49,408 ids), padded with "!" (id 0), 77 tokens.
SD2_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": "<|startoftext|>",
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "!",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}
SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"

# Released parameter counts, one per part, and where each comes from.
RELEASED_PARAMS = {
    # SD-2-base unet/ (diffusers UNet2DConditionModel, 686 tensors); the well-known 865,910,724 (≈ 866 M).
    "sd2_unet": 865_910_724,
    # checkpoint-90000/unet: SD-2-base + 16 image_attentions. The image_attentions' count is the sum of the
    # shapes in tests/data/reference/image_attention_keys.txt (416 tensors): 260,849,600 (see the test).
    "unet": 865_910_724 + 260_849_600,
    # SD-2 ControlNet (from_unet of SD-2-base: the UNet's conv_in, time embedding, down and mid blocks, plus the
    # condition embedding 3-16-32-96-256-320 and 13 zero 1x1 convs) 364,228,240, + 7 image_attentions
    # (182 tensors) 124,803,200 from the same key file.
    "controlnet": 364_228_240 + 124_803_200,
    # SD VAE (AutoencoderKL 128/256/512/512, 2 layers per block, latent 4): 83,653,863.
    "vae": 83_653_863,
    # OpenCLIP-H text tower as SD-2 ships it: 49,408 x 1024 token + 77 x 1024 position embeddings, 23 layers of
    # (4 x (1024^2 + 1024) attention + 2 x 2 x 1024 norms + 1024x4096+4096 + 4096x1024+1024 MLP) = 12,596,224 each,
    # final norm 2,048: 50,593,792 + 78,848 + 289,713,152 + 2,048 = 340,387,840.
    "text_encoder": 340_387_840,
    # SAM 2.1 hiera-tiny, the whole model as in sam2.1_hiera_tiny.pt: 38.9 M per the SAM 2.1 README
    # (build_sam2 of configs/sam2.1/sam2.1_hiera_t.yaml counts 38,962,498).
    "sam2": 38_900_000,
    # RAM tagger (Swin-L backbone, projections, tagging head, fc): RAM_DAPE.md §6.1.
    "ram": 212_117_045,
    # DAPE.pth, 248 LoRA tensors, r = 8 (RAM_DAPE.md §2.2, "about 1.78 M"); from first principles:
    # Swin qkv 32 x C summed over 24 blocks (C = 192x2, 384x2, 768x18, 1536x2) = 577,536;
    # tagging head 2 layers x (query 8x(768+768) + key 8x(512+768)) = 45,056;
    # tag_encoder 12 layers x (3 x 8x(768+768) + 8x(512+768)) = 565,248; text_decoder 12 x 4 x 8x(768+768) = 589,824.
    "dape": 577_536 + 45_056 + 565_248 + 589_824,
}
# A part matches its released count within this fraction (the SAM2 README rounds to 0.1 M).
COUNT_TOLERANCE = 0.01


_REGISTER = nn.Module.register_parameter


@contextmanager
def params_on_meta():
    """Parameters are created on `meta` (no memory, init is a no-op); buffers and other tensors stay real.

    What accelerate's init_empty_weights(include_buffers=False) does: models whose constructors compute
    with tensors (SAM2's Hiera calls .item()) or hold computed buffers (Swin's masks) build unchanged.
    """
    register = _REGISTER

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _init_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_unet() -> nn.Module:
    from .unet import SemanticUNet

    return SemanticUNet(**_init_kwargs(RELEASE_UNET_CONFIG))


def build_controlnet() -> nn.Module:
    from .controlnet import SemanticControlNet

    return SemanticControlNet(**_init_kwargs(RELEASE_CONTROLNET_CONFIG))


def build_vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**_init_kwargs(SD2_VAE_CONFIG))


def build_text_encoder() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**SD2_TEXT_ENCODER_CONFIG))


def build_sam2() -> nn.Module:
    """The whole SAM 2.1 hiera-tiny model (all heads), as sam2's own builder makes it."""
    from sam2.build_sam import build_sam2 as build

    # Its builder moves the model to a device: `meta` too when the parameters are there (params_on_meta).
    device = "cpu" if nn.Module.register_parameter is _REGISTER else "meta"
    return build(SAM2_CONFIG, ckpt_path=None, device=device, mode="eval")


def build_ram() -> nn.Module:
    from ..ram import RAMConfig, RAMTagger, read_tag_list, read_thresholds

    return RAMTagger(RAMConfig(), read_tag_list(), read_thresholds())


BUILDERS = {
    "unet": build_unet,
    "controlnet": build_controlnet,
    "vae": build_vae,
    "text_encoder": build_text_encoder,
    "sam2": build_sam2,
    "ram": build_ram,
}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_counts(parts=tuple(BUILDERS)) -> dict[str, int]:
    """Each part built with its parameters on `meta` (instant, no memory) -> its parameter count."""
    counts = {}
    for part in parts:
        with params_on_meta():
            counts[part] = count_params(BUILDERS[part]())
    return counts


def within_tolerance(part: str, count: int) -> bool:
    released = RELEASED_PARAMS[part]
    return abs(count - released) <= COUNT_TOLERANCE * released
