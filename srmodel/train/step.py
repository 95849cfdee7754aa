"""One optimizer step of the recipe: the epsilon-MSE loss, accumulation, clipping, and checkpoint state.

Randomness is drawn per sample from a generator seeded by (seed, epoch, sample key):
the noise, timestep, null-text coin and VAE posterior sample of a sample do not
depend on which worker sees it or what else is in its batch. That is what makes
1 worker x accumulation 2 and 2 workers x accumulation 1 give the same gradient,
and a resumed run the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..models import vae as vae_ops
from .config import TrainRecipe
from .model import SRTrainModel, TrainParts, load_trainable_state, trainable_state_dict


def sample_seed(seed: int, epoch: int, key: int) -> int:
    digest = hashlib.sha256(f"{seed}|{epoch}|{int(key)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_draws(seed: int, epoch: int, keys: list[int], null_text_ratio: float, timesteps: int):
    """Per sample: its generator (the VAE sample and the noise are drawn from it next), the null-text coin
    (True: the empty prompt) and t ~ U{0 .. timesteps-1}, in that order."""
    gens = [torch.Generator().manual_seed(sample_seed(seed, epoch, k)) for k in keys]
    drop = torch.stack([torch.rand((), generator=g) < null_text_ratio for g in gens])
    t = torch.stack([torch.randint(0, timesteps, (), generator=g) for g in gens])
    return gens, drop, t


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div(255)


def unwrap(model: torch.nn.Module) -> SRTrainModel:
    return model.module if hasattr(model, "module") else model


class Trainer:
    """Owns the optimizer, LR schedule and grad scaler of one worker; `model` may be DDP-wrapped."""

    def __init__(self, parts: TrainParts, recipe: TrainRecipe, device="cpu", model: torch.nn.Module | None = None):
        self.parts, self.recipe = parts, recipe
        self.device = torch.device(device)
        self.model = model if model is not None else parts.model
        self.amp_dtype = recipe.autocast_dtype(self.device)
        self.params = unwrap(self.model).trainable_parameters()
        self.optimizer_name = recipe.optimizer_name(self.device)
        self.optimizer = self._optimizer()
        warmup = recipe.lr_warmup_steps
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        # Loss scaling only for fp16; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _optimizer(self):
        r = self.recipe
        kwargs = dict(lr=r.lr, betas=r.betas, eps=r.eps, weight_decay=r.weight_decay)
        if self.optimizer_name == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise RuntimeError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes) and CUDA; "
                                   "or set optimizer: adamw") from err
            return bnb.optim.AdamW8bit(self.params, **kwargs)
        return torch.optim.AdamW(self.params, **kwargs)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ the loss

    @torch.no_grad()
    def prepare(self, batch: dict, epoch: int, t: int | None = None, null_text: bool = True) -> dict:
        """Frozen work on a micro-batch: latents, noise, t, text states, SAM tokens of the LR-up image.

        `t` fixes the timestep and `null_text=False` keeps every caption (held-out loss); the draws of each
        sample are made all the same, so its noise does not change with them."""
        p, dev = self.parts, self.device
        gens, drop, draws = sample_draws(self.recipe.seed, epoch, batch["key"].tolist(), self.recipe.null_text_ratio,
                                         p.scheduler.config.num_train_timesteps)
        t = draws if t is None else torch.full_like(draws, t)
        drop = drop & null_text
        gt = to_unit(batch["gt"]).to(dev)
        lr_up = to_unit(batch["lr_up"]).to(dev)
        latents = vae_ops.encode(p.vae, gt, gens)  # VAE(GT in [-1, 1]).sample() * scaling factor
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(dev)
        t = t.to(dev)
        noisy = p.scheduler.add_noise(latents, noise, t)
        ids = batch["input_ids"].to(dev)
        ids = torch.where(drop.to(dev)[:, None], p.null_ids.to(dev)[None], ids)
        text = p.text.text_encoder(ids)[0]
        tokens = p.encoder.encode(lr_up)  # SAM of the LR-up image, frozen
        return {"noisy": noisy, "t": t, "text": text, "cond": lr_up, "tokens": tokens, "noise": noise}

    def loss(self, prepared: dict) -> torch.Tensor:
        with self.autocast():
            eps = self.model(prepared["noisy"], prepared["t"], prepared["text"], prepared["cond"], prepared["tokens"])
        return F.mse_loss(eps.float(), prepared["noise"].float())

    @torch.no_grad()
    def held_out_loss(self, batch: dict, timesteps=(100, 300, 500, 700, 900), epoch: int = -1) -> float:
        """The epsilon-MSE of held-out pairs at fixed timesteps and seeds, captions kept: comparable across
        checkpoints (the training loss is too noisy, t being random)."""
        model = unwrap(self.model)
        model.eval()
        try:
            losses = [float(self.loss(self.prepare(batch, epoch, t=t, null_text=False))) for t in timesteps]
        finally:
            model.train()
        return sum(losses) / len(losses)

    def accumulate(self, microbatches: list[dict], epochs: list[int]) -> float:
        """Backward over K micro-batches (DDP syncs on the last only); returns their mean loss."""
        k = len(microbatches)
        total = 0.0
        for i, (batch, epoch) in enumerate(zip(microbatches, epochs)):
            sync = i == k - 1 or not hasattr(self.model, "no_sync")
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                loss = self.loss(self.prepare(batch, epoch))
                self.scaler.scale(loss / k).backward()
            total += float(loss.detach())
        return total / k

    def step(self) -> float:
        """Unscale, clip, update, zero; returns the global grad norm before clipping."""
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.recipe.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ checkpoint state

    def save(self, folder: str | Path, state: dict) -> None:
        """Trainable weights (safetensors), optimizer, LR schedule, scaler, RNG, and `state` (step, data position)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state_dict(unwrap(self.model)), str(folder / "trainable.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                    "scaler": self.scaler.state_dict()}, folder / "optimizer.pt")
        torch.save(_rng_state(), folder / "rng.pt")
        (folder / "state.json").write_text(json.dumps({**state, "optimizer": self.optimizer_name}, indent=2))

    def load(self, folder: str | Path) -> dict:
        folder = Path(folder)
        load_trainable_state(unwrap(self.model), load_file(str(folder / "trainable.safetensors")), str(folder))
        # weights_only: a checkpoint file never runs code when read.
        opt = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.lr_schedule.load_state_dict(opt["lr_schedule"])
        self.scaler.load_state_dict(opt["scaler"])
        _set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
        return json.loads((folder / "state.json").read_text())


def _rng_state() -> dict:
    """Global RNG states as tensors and ints only, so loading needs no unpickling (weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": [int(pos), int(has_gauss), float(gauss)],
             "python": torch.tensor(internal, dtype=torch.int64), "python_version": int(version),
             "python_gauss": gauss_next}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
