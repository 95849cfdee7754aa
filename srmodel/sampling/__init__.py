"""Sampling as released: the DDPM scheduler, the denoising loop (ControlNet -> UNet, CFG), per-image noise and seeds,
and latent tiling with Gaussian blend weights."""
