"""The two-branch degradation of the release: a bicubic 'clean' branch and a second-order Real-ESRGAN branch.

`degrade_group` takes one group of GT crops (the images that share the
group-level draws: branch, resize scale and mode, noise type, second blur,
final order) and a seed. Everything it samples comes from that seed, so a
group's pairs are byte-identical however many workers build the data set.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import DegradeConfig, StageConfig
from .kernels import sample_blur_kernel, sample_final_sinc
from .ugc import apply_ugc
from .ops import filter2d, gaussian_noise, jpeg, poisson_noise, resize, usm_sharpen

RESIZE_TYPES = ("up", "down", "keep")


def _resize_draw(rng: np.random.Generator, stage: StageConfig, modes) -> dict:
    kind = RESIZE_TYPES[rng.choice(3, p=np.asarray(stage.resize_prob) / sum(stage.resize_prob))]
    scale = {"up": lambda: rng.uniform(*stage.resize_up), "down": lambda: rng.uniform(*stage.resize_down),
             "keep": lambda: 1.0}[kind]()
    return {"type": kind, "scale": float(scale), "mode": str(modes[rng.integers(len(modes))])}


def _noise(x: torch.Tensor, rng, gen: torch.Generator, stage: StageConfig) -> tuple[torch.Tensor, list[dict]]:
    n = x.shape[0]
    gaussian = rng.uniform() < stage.gaussian_noise_prob  # the type is a group draw, magnitudes per image
    gray = torch.tensor([bool(rng.uniform() < stage.gray_noise_prob) for _ in range(n)])
    if gaussian:
        sigma = torch.tensor([rng.uniform(*stage.noise_range) / 255 for _ in range(n)], dtype=torch.float32)
        out = gaussian_noise(x, sigma, gray, gen)
        return out, [{"type": "gaussian", "sigma_255": float(s * 255), "gray": bool(g)} for s, g in zip(sigma, gray)]
    scale = torch.tensor([rng.uniform(*stage.poisson_scale_range) for _ in range(n)], dtype=torch.float32)
    out = poisson_noise(x, scale, gray, gen)
    return out, [{"type": "poisson", "scale": float(s), "gray": bool(g)} for s, g in zip(scale, gray)]


def _jpeg(x: torch.Tensor, rng, stage: StageConfig) -> tuple[torch.Tensor, list[int]]:
    q = [int(rng.integers(stage.jpeg_range[0], stage.jpeg_range[1] + 1)) for _ in range(x.shape[0])]
    return jpeg(x.clamp(0, 1), q), q


def degrade_group(gt: torch.Tensor, config: DegradeConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(target, lr, params): GT (G,3,H,W) in [0,1] -> training target and LR at 1/scale, with every draw recorded."""
    g, _, h, w = gt.shape
    s = config.scale
    if h % s or w % s:
        raise ValueError(f"GT crops must be a multiple of the scale {s}, got {w}x{h}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    params = [{"seed": int(seed), "group_size": g} for _ in range(g)]
    target = usm_sharpen(gt) if config.usm_target else gt
    lr_size = (h // s, w // s)

    if rng.uniform() < config.clean_prob:
        lr = resize(gt, size=lr_size, mode="bicubic")
        for p in params:
            p["branch"] = "clean"
    else:
        k1 = [sample_blur_kernel(rng, config.kernel1.model_dump()) for _ in range(g)]
        k2 = [sample_blur_kernel(rng, config.kernel2.model_dump()) for _ in range(g)]
        sinc = [sample_final_sinc(rng, config.final_sinc_prob, config.final_sinc_omega) for _ in range(g)]
        out = filter2d(gt, torch.stack([k for k, _ in k1]))
        r1 = _resize_draw(rng, config.stage1, config.resize_modes)
        out = resize(out, scale=r1["scale"], mode=r1["mode"]) if r1["type"] != "keep" else out
        out, n1 = _noise(out, rng, gen, config.stage1)
        out, q1 = _jpeg(out, rng, config.stage1)
        second_blur = bool(rng.uniform() < config.second_blur_prob)
        if second_blur:
            out = filter2d(out, torch.stack([k for k, _ in k2]))
        r2 = _resize_draw(rng, config.stage2, config.resize_modes)
        size2 = (max(1, int(h / s * r2["scale"])), max(1, int(w / s * r2["scale"])))
        out = resize(out, size=size2, mode=r2["mode"])
        out, n2 = _noise(out, rng, gen, config.stage2)
        sinc_first = bool(rng.uniform() < 0.5)
        final_mode = str(config.resize_modes[rng.integers(len(config.resize_modes))])
        sinc_k = torch.stack([k for k, _ in sinc])
        if sinc_first:  # resize -> sinc -> JPEG, else JPEG -> resize -> sinc (both as in Real-ESRGAN)
            out = filter2d(resize(out, size=lr_size, mode=final_mode), sinc_k)
            out, q2 = _jpeg(out, rng, config.stage2)
        else:
            out, q2 = _jpeg(out, rng, config.stage2)
            out = filter2d(resize(out, size=lr_size, mode=final_mode), sinc_k)
        lr = out
        for i, p in enumerate(params):
            p.update(
                branch="degrade", kernel1=k1[i][1], resize1=r1, noise1=n1[i], jpeg1=q1[i],
                second_blur=second_blur, kernel2=k2[i][1] if second_blur else None, resize2=r2, noise2=n2[i],
                final_order="resize-sinc-jpeg" if sinc_first else "jpeg-resize-sinc", final_resize_mode=final_mode,
                final_sinc=sinc[i][1], jpeg2=q2[i],
            )
    if config.ugc is not None:  # UGC artefacts on top of the chain; the group's last draws
        lr, ugc = apply_ugc(lr, rng, config.ugc)
        for p, u in zip(params, ugc):
            p["ugc"] = u
    lr = (lr.clamp(0, 1) * 255).round() / 255  # saved as 8-bit PNG
    return target.clamp(0, 1), lr, params
