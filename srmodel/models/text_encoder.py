"""Text conditioning: prompt assembly as released, CLIP text encoder from the SD-2-base folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ..errors import WeightsError
from ..prompts import FixedTagger, Tagger, build_prompt  # noqa: F401 - re-exported

class TextConditioner:
    """CLIP tokenizer + text encoder; prompts -> (B, 77, D) last hidden states, as the release used."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, sd_folder: str | Path, *, torch_dtype=torch.float32, device="cpu") -> "TextConditioner":
        sd_folder = Path(sd_folder)
        for sub in ("tokenizer", "text_encoder"):
            if not (sd_folder / sub).is_dir():
                raise FileNotFoundError(
                    f"{sd_folder / sub} does not exist; point the model source at a stable-diffusion-2-base "
                    "folder with tokenizer/ and text_encoder/"
                )
        tokenizer = CLIPTokenizer.from_pretrained(sd_folder / "tokenizer")
        encoder, info = CLIPTextModel.from_pretrained(
            sd_folder / "text_encoder", torch_dtype=torch_dtype, output_loading_info=True
        )
        # position_ids is a buffer older transformers versions saved; its absence is harmless.
        missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
        if missing or info.get("mismatched_keys"):
            raise WeightsError(
                f"{sd_folder / 'text_encoder'} does not match its config: missing {missing[:10]}, "
                f"mismatched {list(info.get('mismatched_keys', []))[:10]}"
            )
        return cls(tokenizer, encoder.to(device))

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,  # 77 tokens, as released: long tag lists lose their tail
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]
