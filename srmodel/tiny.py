"""The `tiny` preset's model: every part at random init, written in the released on-disk formats.

Built once per cache folder and loaded back through the same loaders as the
real weights, so tests and benchmarks exercise the real loading code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import ModelSource

TINY_VERSION = "tiny-v2"
TEXT_DIM = 32

# SD-2 layout (3 cross-attention levels + 1 plain, linear projections, 1:..:4:4 heads), shrunk.
UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[16, 24, 32, 32],
    layers_per_block=2,
    attention_head_dim=[2, 3, 4, 4],
    cross_attention_dim=TEXT_DIM,
    norm_num_groups=8,
    use_linear_projection=True,
)
CONTROLNET_CONFIG = dict(
    {k: v for k, v in UNET_CONFIG.items() if k not in ("sample_size", "out_channels", "up_block_types")},
    conditioning_embedding_out_channels=[8, 16, 32, 32],
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("UGCSR_CACHE", Path.home() / ".cache" / "ugcsr"))


def _released_paths(base: str, seesr: str) -> dict[str, str]:
    """The files and folders every release names, under `base`."""
    return dict(sd_base=f"{base}/stable-diffusion-2-base", seesr=f"{base}/{seesr}",
                sam2_checkpoint=f"{base}/sam2.1_hiera_tiny.pt", ram=f"{base}/ram_swin_large_14m.pth",
                dape=f"{base}/DAPE.pth")


def tiny_source(folder: Path | str, seesr: str = "checkpoint-tiny") -> ModelSource:
    """The tiny parts under `folder`: a local path or any fsspec URI (joined with '/', valid for both)."""
    base = str(folder).rstrip("/")
    return ModelSource(
        **_released_paths(base, seesr),
        sam2_config=f"{base}/sam2.1_hiera_tiny_test.yaml",
        ram_config="tiny",
        ram_tag_list=f"{base}/ram_tag_list.txt",
        ram_thresholds=f"{base}/ram_tag_list_threshold.txt",
        revision=TINY_VERSION,
    )


def released_tiny_source(folder: Path | str) -> ModelSource:
    """The tiny weights as `python -m srmodel.tiny DIR` lays them out (the release's folder names)."""
    return tiny_source(folder, seesr=RELEASED_CHECKPOINT)


def _byte_tokenizer(folder: Path):
    """A CLIP BPE tokenizer with only byte-level symbols (no merges): small, offline, real format."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)
    folder.mkdir(parents=True)
    tok.save_pretrained(folder)
    return tok


def _perturb(model: torch.nn.Module, gen: torch.Generator, scale: float = 0.05) -> None:
    # Zero-initialised layers (ControlNet zero convs, conv_out) would switch whole paths off.
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(scale * torch.randn(p.shape, generator=gen))


RELEASED_CHECKPOINT = "checkpoint-90000"


def _write_tiny(folder: Path, seesr: str = "checkpoint-tiny") -> None:
    # Heavy imports here: loading an already built tiny model must stay cheap.
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from .models.controlnet import SemanticControlNet
    from .sampling.ddpm import SD2_SCHEDULER_CONFIG
    from .semantic.sam2_encoder import TINY_TEST_CONFIG, SemanticEncoder, save_sam2_checkpoint
    from .models.unet import SemanticUNet

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    sd = folder / "stable-diffusion-2-base"
    tok = _byte_tokenizer(sd / "tokenizer")
    text_cfg = CLIPTextConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    CLIPTextModel(text_cfg).save_pretrained(sd / "text_encoder")
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(sd / "vae")
    (sd / "scheduler").mkdir()
    sched = dict(SD2_SCHEDULER_CONFIG, _class_name="PNDMScheduler", _diffusers_version="0.8.0")
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))

    unet = SemanticUNet(**UNET_CONFIG)
    controlnet = SemanticControlNet(**CONTROLNET_CONFIG)
    # As ControlNetModel.from_unet does: the shared encoder starts as a copy of the UNet's.
    shared = {k: v for k, v in unet.state_dict().items() if k in controlnet.state_dict()}
    controlnet.load_state_dict(shared, strict=False)
    _perturb(unet, gen)
    _perturb(controlnet, gen)
    unet.save_pretrained(folder / seesr / "unet")
    controlnet.save_pretrained(folder / seesr / "controlnet")

    encoder = SemanticEncoder.from_config(TINY_TEST_CONFIG)
    save_sam2_checkpoint(encoder, folder / "sam2.1_hiera_tiny.pt")
    shutil.copy(TINY_TEST_CONFIG, folder / "sam2.1_hiera_tiny_test.yaml")
    _write_tiny_tagger(folder, gen)


TINY_TAGS = ["dog", "grass", "sky", "building", "person", "car", "tree"]


def _write_tiny_tagger(folder: Path, gen: torch.Generator) -> None:
    """A 7-class RAM with DAPE, saved like the real files (junk keys included) so the real loader runs."""
    from .ram import TINY_RAM_CONFIG, RAMTagger
    from .ram.export import save_dape, save_ram_checkpoint

    (folder / "ram_tag_list.txt").write_text("\n".join(TINY_TAGS))
    thresholds = torch.linspace(0.3, 0.7, len(TINY_TAGS))  # low: random weights still fire some tags
    (folder / "ram_tag_list_threshold.txt").write_text("".join(f"{t:.2f}\n" for t in thresholds.tolist()))
    model = RAMTagger(TINY_RAM_CONFIG, TINY_TAGS, thresholds)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            is_norm_gain = name.endswith("weight") and ("norm" in name or "LayerNorm" in name)
            p.copy_(0.2 * torch.randn(p.shape, generator=gen) + (1.0 if is_norm_gain else 0.0))
    save_ram_checkpoint(model, folder / "ram_swin_large_14m.pth")
    save_dape(model, folder / "DAPE.pth", gen)


def ensure_tiny_model(cache_dir: str | Path | None = None) -> ModelSource:
    """Build the tiny model folder if absent (atomic: concurrent builders on one node are safe)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / TINY_VERSION
    if not (folder / "COMPLETE").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}-", dir=cache))
        try:
            _write_tiny(tmp)
            (tmp / "COMPLETE").write_text(TINY_VERSION)
            try:
                os.rename(tmp, folder)
            except OSError:  # another process won the race; its folder is complete
                if not (folder / "COMPLETE").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tiny_source(folder)


def real_source(folder: Path | str) -> ModelSource:
    """A real-size release under a local `folder`, as `ugcsr upscale --preset wild --weights DIR` finds it."""
    return ModelSource(**_released_paths(str(Path(folder).expanduser().absolute()), RELEASED_CHECKPOINT))


SIZES = ("tiny", "real")


def write_released_layout(folder: str | Path, size: str = "tiny", dtype: str = "fp32", log=print) -> ModelSource:
    """Write random weights into `folder` in the released layout, to upload like the real ones.

    folder/stable-diffusion-2-base/, folder/checkpoint-90000/{unet,controlnet}/, folder/sam2.1_hiera_tiny.pt
    and the tagger files (ram_swin_large_14m.pth, DAPE.pth, the tag list and thresholds).
    size="tiny": the tiny preset's weights (the same seeds as the cached tiny model: the same weights), plus
    its SAM2 yaml; fp32 only. size="real": every part at its released size (srmodel/realsize.py), in
    `dtype` ("fp32" as released, or "fp16"), one line per part to `log`; loads with the `wild` preset.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if size == "tiny" and dtype != "fp32":
        raise ValueError("the tiny weights are written in fp32 only; --dtype applies to --size real")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clash = [p.name for p in folder.iterdir()]
    if clash:
        raise FileExistsError(f"{folder} is not empty ({', '.join(sorted(clash)[:5])}); pick an empty or new folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{size}-", dir=folder))
    try:
        if size == "real":
            from .realsize import write_real_release

            write_real_release(tmp, dtype, log=log)
        else:
            _write_tiny(tmp, seesr=RELEASED_CHECKPOINT)
        for part in tmp.iterdir():
            os.rename(part, folder / part.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return real_source(folder) if size == "real" else released_tiny_source(folder)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m srmodel.tiny",
                                     description="Write random weights in the released layout.")
    parser.add_argument("dir", help="an empty or new folder; then: ugcsr upscale SRC DST --preset tiny --weights DIR "
                                    "(--preset wild for --size real)")
    parser.add_argument("--size", choices=SIZES, default="tiny",
                        help="tiny: the tiny preset's model; real: every part at its released size (docs/realsize.md)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                        help="on-disk dtype with --size real (fp32 as released; fp16 halves disk and time)")
    args = parser.parse_args(argv)
    if args.size == "tiny" and args.dtype != "fp32":
        parser.error("--dtype fp16 needs --size real")
    try:
        write_released_layout(args.dir, size=args.size, dtype=args.dtype)
    except FileExistsError as err:
        parser.exit(2, f"error: {err}\n")
    print(args.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
