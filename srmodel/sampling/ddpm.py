"""DDPM sampling as the release ran it: SD-2-base scheduler config, 'leading' spacing, fixed_small variance.

`ddpm_step` restates diffusers' DDPMScheduler.step (epsilon prediction) so
that the noise can be given per image (per-image seeds, injected noise in
tests) instead of drawn from one generator for the whole batch. The scalars
are float32 0-dim tensors taken from the scheduler's own table, as diffusers
does; tests check it against DDPMScheduler.step and the authors' recordings.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler

# stable-diffusion-2-base/scheduler/scheduler_config.json (the release loads it as DDPM).
SD2_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}


def make_scheduler(folder: str | None = None) -> DDPMScheduler:
    """DDPMScheduler from an SD-2-base folder's scheduler/, or the built-in SD-2-base config."""
    if folder is not None:
        return DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return DDPMScheduler.from_config(SD2_SCHEDULER_CONFIG)


def step_coefficients(scheduler: DDPMScheduler, t: int) -> dict[str, torch.Tensor]:
    """The float32 scalars of one epsilon-prediction DDPM step at timestep t."""
    if scheduler.config.prediction_type != "epsilon" or scheduler.config.variance_type != "fixed_small":
        raise ValueError("ddpm_step supports epsilon prediction with fixed_small variance (the SD-2-base config)")
    if scheduler.config.thresholding or scheduler.config.clip_sample:
        raise ValueError("ddpm_step does not implement thresholding/clip_sample (off in SD-2-base)")
    t = int(t)
    prev_t = int(scheduler.previous_timestep(t))
    # IEEE float32 scalar arithmetic (numpy float32 scalars are correctly rounded).
    # torch's vectorised float32 sqrt can be 1 ulp off, which the authors' run was not.
    f = np.float32
    a_t = f(scheduler.alphas_cumprod[t].item())
    a_prev = f(scheduler.alphas_cumprod[prev_t].item()) if prev_t >= 0 else f(1.0)
    beta_t, beta_prev = f(1) - a_t, f(1) - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = f(1) - cur_alpha
    variance = max(beta_prev / beta_t * cur_beta, f(1e-20))
    coefs = {
        "sqrt_alpha_prod_t": np.sqrt(a_t),
        "sqrt_beta_prod_t": np.sqrt(beta_t),
        "coef_x0": (np.sqrt(a_prev) * cur_beta) / beta_t,
        "coef_xt": np.sqrt(cur_alpha) * beta_prev / beta_t,
        "std": np.sqrt(variance) if t > 0 else f(0),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in coefs.items()}


def ddpm_step(scheduler: DDPMScheduler, eps: torch.Tensor, t: int, x: torch.Tensor, noise: torch.Tensor | None):
    """x_{t-1} from x_t and predicted noise; `noise` ~ N(0, I) shaped like x (None only at t == 0)."""
    c = step_coefficients(scheduler, t)
    x0 = (x - c["sqrt_beta_prod_t"] * eps) / c["sqrt_alpha_prod_t"]
    mean = c["coef_x0"] * x0 + c["coef_xt"] * x
    if int(t) > 0:
        if noise is None:
            raise ValueError(f"DDPM step at t={int(t)} needs noise")
        return mean + c["std"] * noise.to(x.dtype)
    return mean
