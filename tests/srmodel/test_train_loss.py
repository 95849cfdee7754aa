"""The training loss as the recipe states it, checked piece by piece on the tiny model (no Ray):
target = the noise, z_t = add_noise(z_0, noise, t) with t ~ U{0..999}, the null-text rate, SAM on the LR-up."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srmodel import get_preset
from srmodel.models import vae as vae_ops
from srmodel.train import TrainRecipe, load_train_parts
from srmodel.train.step import Trainer, sample_draws, to_unit


def test_timesteps_cover_0_to_999_uniformly_and_the_null_rate_is_the_recipes():
    keys = list(range(20_000))
    _, drop, t = sample_draws(0, 0, keys, 0.5, 1000)
    assert int(t.min()) == 0 and int(t.max()) == 999
    counts = np.bincount(t.numpy() // 100, minlength=10)  # ten bins of 100 steps: ~2000 each
    assert counts.min() > 1800 and counts.max() < 2200, counts
    assert abs(float(drop.float().mean()) - 0.5) < 0.015
    _, drop10, _ = sample_draws(0, 0, keys, 0.1, 1000)
    assert abs(float(drop10.float().mean()) - 0.1) < 0.01
    # per sample, not per batch or worker: the same key draws the same, another epoch draws anew
    _, again, t_again = sample_draws(0, 0, keys[:100], 0.5, 1000)
    assert torch.equal(t_again, t[:100]) and torch.equal(again, drop[:100])
    _, _, t_next = sample_draws(0, 1, keys[:100], 0.5, 1000)
    assert not torch.equal(t_next, t[:100])


@pytest.fixture(scope="module")
def trainer(tiny_model):
    parts = load_train_parts(get_preset("tiny").model_copy(update={"source": tiny_model}), TrainRecipe())
    return Trainer(parts, TrainRecipe(null_text_ratio=0.5))


def _batch(n=4, size=64):
    rng = np.random.default_rng(0)
    return {"gt": torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)),
            "lr_up": torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)),
            "input_ids": torch.full((n, 77), 7, dtype=torch.long), "key": torch.arange(n) + 1}


def test_the_noisy_latent_the_target_and_the_conditions(trainer, monkeypatch):
    p = trainer.parts
    batch = _batch()
    seen = []
    real_encode = p.encoder.encode
    monkeypatch.setattr(p.encoder, "encode", lambda x: seen.append(x.clone()) or real_encode(x))
    prepared = trainer.prepare(batch, epoch=3)
    # SAM sees the LR-up image in [0, 1], as the authors' SAM2 predictor did
    assert len(seen) == 1 and torch.equal(seen[0], to_unit(batch["lr_up"]))
    assert torch.equal(prepared["cond"], to_unit(batch["lr_up"]))
    # z_t = sqrt(acp_t) z_0 + sqrt(1 - acp_t) noise, with z_0 = VAE(GT).sample() * scaling (replayed draws)
    gens, drop, t = sample_draws(trainer.recipe.seed, 3, batch["key"].tolist(), 0.5, 1000)
    z0 = vae_ops.encode(p.vae, to_unit(batch["gt"]), gens)
    acp = p.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).to(z0.dtype)
    assert torch.equal(prepared["t"], t)
    expected = acp.sqrt() * z0 + (1 - acp).sqrt() * prepared["noise"]
    torch.testing.assert_close(prepared["noisy"], expected, rtol=1e-5, atol=1e-5)
    assert float(prepared["noise"].std()) == pytest.approx(1.0, abs=0.1), "the target is unit Gaussian noise"
    # the null-text coin: dropped rows get the empty prompt's states, kept rows the caption's
    null = p.text.text_encoder(p.null_ids[None])[0][0]
    caption = p.text.text_encoder(batch["input_ids"][:1])[0][0]
    for i, dropped in enumerate(drop.tolist()):
        torch.testing.assert_close(prepared["text"][i], null if dropped else caption)
    assert 0 < int(drop.sum()) < len(drop), "this batch has both (seeded): both branches are checked"


def test_the_loss_is_the_mse_to_the_noise(trainer):
    prepared = trainer.prepare(_batch(2), epoch=0)
    with torch.no_grad():
        eps = trainer.model(prepared["noisy"], prepared["t"], prepared["text"], prepared["cond"], prepared["tokens"])
        loss = trainer.loss(prepared)
    assert float(loss) == pytest.approx(float(F.mse_loss(eps.float(), prepared["noise"].float())), rel=1e-6)
    assert float(loss) != pytest.approx(float(F.mse_loss(eps.float(), prepared["noisy"].float())), rel=1e-3)


def test_the_held_out_loss_is_fixed_for_fixed_weights_and_moves_with_them(trainer):
    batch = _batch(2)
    first = trainer.held_out_loss(batch, (100, 900))
    assert trainer.held_out_loss(batch, (100, 900)) == first, "fixed t, fixed seeds, captions kept"
    prepared = trainer.prepare(batch, epoch=-1, t=100, null_text=False)
    assert torch.equal(prepared["t"], torch.tensor([100, 100]))
    trainer.accumulate([batch], [0])
    trainer.step()
    assert trainer.held_out_loss(batch, (100, 900)) != first
