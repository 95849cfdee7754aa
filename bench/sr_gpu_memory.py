"""The SR stage's GPU memory, counted on `meta` at real size: the constants of srmodel/sampling/memory_model.py.

    python3 bench/sr_gpu_memory.py [--json out.json] [--tiles 96,64] [--rows 1,2,4,8]

No weights and no GPU needed (seconds of compute, about a minute to build the modules): the real
UNet + ControlNet (release configs, image attention on, 4,096 SAM tokens of width 256) and the SD-2
VAE are built with their parameters on `meta`, and every tensor a forward allocates is counted at
torch's dispatcher (`srmodel.sampling.live_bytes.LiveBytes`) with attention counted as a fused kernel
(flash / memory-efficient on a GPU: its output only). Printed per dtype:

- weights: bytes of the parameters and buffers the SR stage puts on the GPU (UNet, ControlNet, VAE,
  text encoder; K/V not folded, which is slightly more than a folded load holds);
- the peak of one ControlNet -> UNet forward under no_grad at each latent tile and row count (a row
  is one latent tile of one CFG branch) and its least-squares line: bytes per row + intercept;
- the VAE decoder's peak at the largest latent the release decodes untiled (tile 224 + 22 = 246).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from srmodel.models.release_configs import (  # noqa: E402
    build_controlnet, build_text_encoder, build_unet, build_vae, params_on_meta)
from srmodel.sampling.live_bytes import LiveBytes, fused_attention  # noqa: E402

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def nbytes(module, dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
               for t in [*module.parameters(), *module.buffers()])


def unet_peak(unet, cn, rows: int, tile: int, dtype) -> int:
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(rows, 4, tile, tile, **meta)
    text = torch.empty(rows, 77, 1024, **meta)
    cond = torch.empty(rows, 3, 8 * tile, 8 * tile, **meta)
    tokens = torch.empty(rows, 4096, 256, **meta)
    t = torch.full((rows,), 500, device="meta")
    counter = LiveBytes()
    with torch.no_grad(), fused_attention(), counter:
        down, mid = cn(x, t, text, cond, tokens, return_dict=False)
        out = unet(x, t, text, tokens, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                   return_dict=False)[0]
        del down, mid, out
    return counter.peak


def vae_peak(vae, latent: int, dtype) -> int:
    z = torch.empty(1, 4, latent, latent, device="meta", dtype=dtype)
    counter = LiveBytes()
    with torch.no_grad(), fused_attention(), counter:
        x = vae.decoder(vae.post_quant_conv(z))
        del x
    return counter.peak


def fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", default="96,64")
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--vae-latent", type=int, default=246)
    ap.add_argument("--json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with params_on_meta():
        parts = {"unet": build_unet(), "controlnet": build_controlnet(), "vae": build_vae(),
                 "text_encoder": build_text_encoder()}
    out = {"torch": torch.__version__, "build_s": round(time.perf_counter() - t0, 1), "dtypes": {}}
    rows = [int(r) for r in args.rows.split(",")]
    for name, dtype in DTYPES.items():
        m = {k: v.to("meta", dtype).eval() for k, v in parts.items()}
        rec = {"weights": {k: nbytes(v, dtype) for k, v in m.items()}, "unet_forward": {}, "fit": {}}
        for tile in (int(t) for t in args.tiles.split(",")):
            peaks = [unet_peak(m["unet"], m["controlnet"], r, tile, dtype) for r in rows]
            slope, intercept = fit(rows, peaks)
            rec["unet_forward"][tile] = dict(zip(rows, peaks))
            rec["fit"][tile] = {"bytes_per_row": round(slope), "intercept": round(intercept)}
            print(f"{name} tile {tile}: peaks {[f'{p / 2**30:.3f}' for p in peaks]} GiB at rows {rows}; "
                  f"{slope / 2**30:.4f} GiB/row + {intercept / 2**30:.4f} GiB", flush=True)
        rec["vae_decode_peak"] = {args.vae_latent: vae_peak(m["vae"], args.vae_latent, dtype)}
        print(f"{name} weights {sum(rec['weights'].values()) / 2**30:.3f} GiB {rec['weights']}; VAE decode at "
              f"{args.vae_latent}: {rec['vae_decode_peak'][args.vae_latent] / 2**30:.3f} GiB", flush=True)
        out["dtypes"][name] = rec
    out["total_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
