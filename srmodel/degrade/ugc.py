"""Extra LR degradations of short-form user-generated video (UGC) that the Real-ESRGAN chain lacks.

Real-ESRGAN models blur, resize, noise and JPEG. Frames of short-video
platforms have been through more: a real video codec (H.264 blocking,
ringing, chroma bleeding), 4:2:0 chroma subsampling, several transcodes at
different resolutions, the aggressive sharpening of phone cameras and apps,
captions and watermarks, and the tone shifts of auto-exposure and filters.

`apply_ugc` applies these to an LR batch *after* the Real-ESRGAN chain, each
op with its own probability, per image, in a fixed physical order (capture
and editing first, then the platform's processing):

    brightness_contrast -> oversharpen -> overlay_text -> rescale_chain -> chroma_subsample -> video_codec

Every draw comes from the numpy Generator it is given, so the result is fully
determined by the generator's state, and every sampled parameter is recorded
per image as plain JSON. Images are float tensors (B, 3, H, W) in [0, 1]; each
op returns the input's size, dtype and device, clamped to [0, 1].

Integration in `degrade_group` (done by the caller, not here): after the
chain and before the 8-bit rounding, ``if config.ugc: lr, ugc = apply_ugc(lr,
rng, config.ugc)`` and store ``ugc[i]`` under ``params[i]["ugc"]``. Being the
last draws of the group's ``rng``, they leave all earlier draws unchanged.
"""

from __future__ import annotations

import io
import math
import string

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .config import UGCConfig
from .ops import RESIZE_MODES, filter2d, gaussian_kernel_1d, resize

__all__ = [
    "apply_ugc",
    "brightness_contrast",
    "chroma_subsample",
    "overlay_text",
    "oversharpen",
    "rescale_chain",
    "video_codec",
]

# BT.601 luma weights (as JPEG and SD video).
_KR, _KG, _KB = 0.299, 0.587, 0.114
_TEXT_CHARS = string.ascii_letters + string.digits
_TEXT_COLOURS = ((255, 255, 255), (255, 230, 0), (0, 0, 0), (255, 64, 64))  # white, yellow, black, red; else random
_TEXT_STYLES = ("outline", "shadow", "none")


# ----------------------------------------------------------------------------- colour helpers


def _rgb_to_ypbpr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BT.601 RGB (B,3,H,W) -> Y in [0, 1] and Pb, Pr in [-0.5, 0.5], each (B,1,H,W)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    y = _KR * r + _KG * g + _KB * b
    return y, (b - y) / (2 * (1 - _KB)), (r - y) / (2 * (1 - _KR))


def _ypbpr_to_rgb(y: torch.Tensor, pb: torch.Tensor, pr: torch.Tensor) -> torch.Tensor:
    """Inverse of `_rgb_to_ypbpr`, not clamped."""
    r = y + 2 * (1 - _KR) * pr
    b = y + 2 * (1 - _KB) * pb
    g = (y - _KR * r - _KB * b) / _KG
    return torch.cat([r, g, b], dim=1)


def _like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return out.clamp(0, 1).to(device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------- the ops


def video_codec(x: torch.Tensor, crf: int, preset: str = "medium") -> torch.Tensor:
    """A real H.264 encode/decode round trip (libx264 through PyAV, yuv420p, in memory), one stream per image.

    Models the re-encoding every short-video platform applies on upload (and
    again on re-upload): macroblock blocking, ringing around edges, flattened
    texture and chroma bleeding from 4:2:0 — artefacts JPEG only partly
    resembles (different transform sizes, deblocking filter, intra prediction,
    rate control). ``crf`` is x264's constant rate factor (higher = worse;
    platforms sit around 23-35), ``preset`` an x264 preset (faster presets
    drop tools such as CABAC, trellis and, for ultrafast, the deblocking filter).

    Each image is coded as a single frame, i.e. an IDR intra frame: identical
    extra frames would only be coded as skip blocks and leave the picture
    unchanged, and the lower quality of real P/B frames is covered by the crf
    range. The RGB <-> YCbCr conversion (BT.601, limited range, 2x2-average
    chroma down, bilinear chroma up as a player does) is done here rather than
    by swscale, so the result depends only on x264 (whose assembly is bit-exact)
    and the spec-exact H.264 decoder; x264 runs single-threaded, so the output
    is deterministic. Odd sizes are padded to even by edge replication and
    cropped back.
    """
    b, c, h, w = x.shape
    if c != 3:
        raise ValueError(f"video_codec needs RGB images, got {c} channels")
    src = x.detach().to(device="cpu", dtype=torch.float32).clamp(0, 1)
    ph, pw = h + h % 2, w + w % 2
    if (ph, pw) != (h, w):
        src = F.pad(src, (0, pw - w, 0, ph - h), mode="replicate")
    y, pb, pr = _rgb_to_ypbpr(src)
    y8 = (16 + 219 * y).round().clamp(0, 255)
    cb8 = (128 + 224 * F.avg_pool2d(pb, 2)).round().clamp(0, 255)
    cr8 = (128 + 224 * F.avg_pool2d(pr, 2)).round().clamp(0, 255)
    planes = torch.cat([y8.reshape(b, ph * pw), cb8.reshape(b, -1), cr8.reshape(b, -1)], dim=1)
    planes = planes.to(torch.uint8).numpy().reshape(b, ph * 3 // 2, pw)
    decoded = [_x264_round_trip(p, int(crf), str(preset)) for p in planes]
    dec = torch.from_numpy(np.stack(decoded)).to(torch.float32)  # (B, ph*3/2, pw)
    n, q = ph * pw, ph * pw // 4
    flat = dec.reshape(b, -1)
    y = (flat[:, :n].reshape(b, 1, ph, pw) - 16) / 219
    pb, pr = ((flat[:, n + k * q: n + (k + 1) * q].reshape(b, 1, ph // 2, pw // 2) - 128) / 224 for k in (0, 1))
    pb, pr = (F.interpolate(p, size=(ph, pw), mode="bilinear", align_corners=False) for p in (pb, pr))
    out = _ypbpr_to_rgb(y, pb, pr)[:, :, :h, :w]
    return _like(out, x)


def _x264_round_trip(yuv: np.ndarray, crf: int, preset: str) -> np.ndarray:
    """Encode one yuv420p frame ((h*3/2, w) uint8 planes) as raw H.264 in memory and decode it back."""
    h, w = yuv.shape[0] * 2 // 3, yuv.shape[1]
    buf = io.BytesIO()
    with av.open(buf, "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1  # deterministic, and cheap for small frames
        stream.codec_context.options = {"crf": str(crf), "preset": preset}
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with av.open(io.BytesIO(buf.getvalue()), "r", format="h264") as inp:
        frames = list(inp.decode(video=0))
    if len(frames) != 1 or (frames[0].height, frames[0].width) != (h, w):
        raise RuntimeError(f"H.264 round trip gave {len(frames)} frame(s), expected one {w}x{h}")
    return frames[0].to_ndarray(format="yuv420p")


def chroma_subsample(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Chroma subsampling alone: RGB -> YCbCr (BT.601), Cb/Cr area-averaged down by ``factor``, bilinear back up.

    Models the colour bleeding of 4:2:0 (``factor`` 2) or heavier (4, old
    apps, screen captures, 4:1:0-like paths) storage without any codec
    artefact: luma is untouched, colour edges smear over ``factor`` pixels.
    """
    if factor < 1:
        raise ValueError(f"chroma factor must be >= 1, got {factor}")
    _, _, h, w = x.shape
    y, pb, pr = _rgb_to_ypbpr(x.clamp(0, 1))
    small = (max(1, math.ceil(h / factor)), max(1, math.ceil(w / factor)))
    pb, pr = (F.interpolate(F.interpolate(p, size=small, mode="area"), size=(h, w), mode="bilinear",
                            align_corners=False) for p in (pb, pr))
    return _like(_ypbpr_to_rgb(y, pb, pr), x)


def rescale_chain(x: torch.Tensor, steps: list[dict]) -> torch.Tensor:
    """Successive down/up round trips, each ``{"scale": f, "down": mode, "up": mode}``, ending at the input size.

    Models repeated transcoding: a clip is scaled down to a platform's
    resolution ladder, shown (scaled up) and screen-recorded or downloaded and
    re-uploaded at another resolution. Every step resizes to ``f`` times the
    original size (at least 1 px) and back; modes are those of `ops.resize`
    (area, bilinear, bicubic; the last two alias as Real-ESRGAN's do). Clamped
    after every resize, as each intermediate file is.
    """
    _, _, h, w = x.shape
    out = x
    for step in steps:
        for mode in (step["down"], step["up"]):
            if mode not in RESIZE_MODES:
                raise ValueError(f"unknown resize mode {mode!r}")
        size = (max(1, round(h * float(step["scale"]))), max(1, round(w * float(step["scale"]))))
        out = resize(out, size=size, mode=step["down"]).clamp(0, 1)
        out = resize(out, size=(h, w), mode=step["up"]).clamp(0, 1)
    return _like(out, x)


def oversharpen(x: torch.Tensor, amount: float, radius: float) -> torch.Tensor:
    """Strong unsharp mask: x + amount·(x − Gaussian_blur_radius(x)), clamped.

    Models the heavy sharpening of phone camera pipelines and editing / beauty
    apps: with ``amount`` 1-3 it overshoots on both sides of every edge
    (bright and dark halos) and amplifies noise and codec artefacts — unlike
    the mild, thresholded USM of the training target. ``radius`` is the
    Gaussian sigma in pixels (kernel size 2·ceil(3σ)+1).
    """
    if radius <= 0:
        return _like(x, x)
    k = 2 * math.ceil(3 * radius) + 1
    g = gaussian_kernel_1d(k, float(radius)).to(torch.float32)
    blur = filter2d(x, torch.outer(g, g))
    return _like(x + float(amount) * (x - blur), x)


def _bitmap_font():
    # Pillow's built-in bitmap font: no font file, and the same glyphs whether or not FreeType is built in
    # (plain load_default() returns a FreeType font when it can, whose rendering may vary across builds).
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader is not None else ImageFont.load_default()


def _text_masks(text: str, size: int, style: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(text alpha, decoration alpha, margin): float32 arrays of the same shape with the text at (margin, margin)."""
    font = _bitmap_font()
    left, top, right, bottom = font.getbbox(text)
    glyphs = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(glyphs).text((-left, -top), text, fill=255, font=font)
    height = max(1, int(size))
    width = max(1, round(glyphs.width * height / glyphs.height))
    glyphs = glyphs.resize((width, height), Image.BILINEAR)  # scaled bitmap font, soft edges like rendered text
    d = max(1, height // 10)  # outline width / shadow offset
    margin = 2 * d
    canvas = Image.new("L", (width + 2 * margin, height + 2 * margin), 0)
    canvas.paste(glyphs, (margin, margin))
    text_a = np.asarray(canvas, dtype=np.float32) / 255
    if style == "outline":
        deco = np.asarray(canvas.filter(ImageFilter.MaxFilter(2 * d + 1)), dtype=np.float32) / 255
    elif style == "shadow":
        deco = np.zeros_like(text_a)
        deco[d:, d:] = 0.7 * text_a[:-d, :-d]
    elif style == "none":
        deco = np.zeros_like(text_a)
    else:
        raise ValueError(f"unknown text style {style!r}; choose from {', '.join(_TEXT_STYLES)}")
    return text_a, deco, margin


def overlay_text(
    x: torch.Tensor,
    text: str,
    position: tuple[int, int],
    size: int,
    colour: tuple[int, int, int],
    opacity: float = 1.0,
    style: str = "outline",
) -> torch.Tensor:
    """Draw ``text`` (top-left at ``position`` = (left, top) px, ``size`` px high, RGB 0-255 ``colour``) on every image.

    Models captions, usernames, watermarks and stickers burnt into UGC frames
    and screenshots. Drawn with Pillow's built-in bitmap font scaled to
    ``size`` (bilinear, so edges are soft like rendered text), blended with
    ``opacity`` (watermarks are often translucent), with a dark ``"outline"``
    (light for dark text), a drop ``"shadow"`` or ``"none"``. Text off the
    image is clipped; pixels away from the text box (plus a margin of
    ~size/5 for the decoration) are left exactly unchanged.

    The overlay is drawn on the LR only, never on the GT: the pair then asks
    the model to *remove* the text, which contradicts keeping text that is in
    the LR. `apply_ugc` therefore applies it with a small probability and flags
    the image (``lr_only_overlay``) so such pairs can be filtered or their
    text box masked out of the loss.
    """
    b, c, h, w = x.shape
    text_a, deco_a, margin = _text_masks(text, size, style)
    full_t = np.zeros((h, w), np.float32)
    full_d = np.zeros((h, w), np.float32)
    x0, y0 = int(position[0]) - margin, int(position[1]) - margin
    mh, mw = text_a.shape
    sx0, sy0 = max(0, -x0), max(0, -y0)
    dx0, dy0 = max(0, x0), max(0, y0)
    dx1, dy1 = min(w, x0 + mw), min(h, y0 + mh)
    if dx1 > dx0 and dy1 > dy0:
        full_t[dy0:dy1, dx0:dx1] = text_a[sy0: sy0 + dy1 - dy0, sx0: sx0 + dx1 - dx0]
        full_d[dy0:dy1, dx0:dx1] = deco_a[sy0: sy0 + dy1 - dy0, sx0: sx0 + dx1 - dx0]
    col = torch.tensor(colour, dtype=torch.float32).reshape(1, 3, 1, 1) / 255
    lum = float(_KR * col[0, 0] + _KG * col[0, 1] + _KB * col[0, 2])
    deco_col = torch.full((1, 3, 1, 1), 0.0 if lum > 0.4 else 1.0)
    a_t = torch.from_numpy(full_t).reshape(1, 1, h, w) * float(opacity)
    a_d = torch.from_numpy(full_d).reshape(1, 1, h, w) * float(opacity)
    out = x.detach().to(device="cpu", dtype=torch.float32).clamp(0, 1)
    out = out * (1 - a_d) + deco_col * a_d
    out = out * (1 - a_t) + col * a_t
    # Exactly the input outside the drawn area (no float round-off from the blend with alpha 0).
    untouched = ((a_t == 0) & (a_d == 0)).expand(b, c, h, w)
    out = torch.where(untouched, x.detach().to(device="cpu", dtype=torch.float32).clamp(0, 1), out)
    return _like(out, x)


def brightness_contrast(x: torch.Tensor, brightness: float = 0.0, contrast: float = 1.0,
                        gamma: float = 1.0) -> torch.Tensor:
    """Global tone shift: ``((x ** gamma) − 0.5)·contrast + 0.5 + brightness``, clamped; identity at (0, 1, 1).

    Models phone auto-exposure and the global filters of camera and editing
    apps (brightness ±0.1, contrast 0.8-1.2, gamma 0.8-1.25; gamma > 1
    darkens the mid-tones). Monotone in every pixel and in ``brightness``.
    """
    out = x.clamp(0, 1)
    if gamma != 1.0:
        out = out ** float(gamma)
    out = out + (out - 0.5) * (float(contrast) - 1) + float(brightness)  # = (out-0.5)·contrast+0.5+b, exact at 1
    return _like(out, x)


# ----------------------------------------------------------------------------- sampling


def _uniform(rng: np.random.Generator, lo_hi) -> float:
    return float(rng.uniform(float(lo_hi[0]), float(lo_hi[1])))


def _integer(rng: np.random.Generator, lo_hi) -> int:
    return int(rng.integers(int(lo_hi[0]), int(lo_hi[1]) + 1))


def _sample_text(rng: np.random.Generator, cfg: UGCConfig, h: int, w: int) -> dict:
    n = _integer(rng, cfg.text_length)
    text = "".join(_TEXT_CHARS[int(i)] for i in rng.integers(len(_TEXT_CHARS), size=n))
    size = _integer(rng, cfg.text_size)
    k = int(rng.integers(len(_TEXT_COLOURS) + 1))
    colour = list(_TEXT_COLOURS[k]) if k < len(_TEXT_COLOURS) else [int(v) for v in rng.integers(256, size=3)]
    style = _TEXT_STYLES[int(rng.integers(len(_TEXT_STYLES)))]
    opacity = _uniform(rng, cfg.text_opacity)
    font = _bitmap_font()
    l, t, r, bt = font.getbbox(text)
    tw = max(1, round(max(1, r - l) * size / max(1, bt - t)))
    left = int(rng.integers(0, max(0, w - tw) + 1))
    top = int(rng.integers(0, max(0, h - size) + 1))
    return {"text": text, "position": [left, top], "size": size, "colour": colour, "opacity": opacity, "style": style}


def apply_ugc(lr: torch.Tensor, rng: np.random.Generator, cfg: UGCConfig) -> tuple[torch.Tensor, list[dict]]:
    """Apply the UGC ops to each LR image with its own probability; returns (lr', params per image).

    ``lr`` (G,3,h,w) is clamped to [0, 1] first; the output has the same
    size, dtype and device, clamped to [0, 1]. Draws, per image in order, for
    each op (order in the module docstring): one uniform for "applied?", then
    that op's parameters if applied — so the result depends only on the state
    of ``rng``. Each image's params dict holds ``ops`` (applied op names, in
    order), one entry per applied op with its parameters, and
    ``lr_only_overlay`` (True when text was drawn on the LR only; see
    `overlay_text`). All probabilities 0 leaves the (clamped) input unchanged.
    """
    g, _, h, w = lr.shape
    base = lr.clamp(0, 1)
    outs, params = [], []
    for i in range(g):
        x = base[i: i + 1]
        p: dict = {"ops": [], "lr_only_overlay": False}
        if rng.uniform() < cfg.brightness_contrast_prob:
            lo, hi = cfg.gamma_range
            q = {"brightness": _uniform(rng, cfg.brightness_range), "contrast": _uniform(rng, cfg.contrast_range),
                 "gamma": float(math.exp(rng.uniform(math.log(lo), math.log(hi))))}
            x = brightness_contrast(x, **q)
            p["ops"].append("brightness_contrast")
            p["brightness_contrast"] = q
        if rng.uniform() < cfg.oversharpen_prob:
            q = {"amount": _uniform(rng, cfg.oversharpen_amount), "radius": _uniform(rng, cfg.oversharpen_radius)}
            x = oversharpen(x, **q)
            p["ops"].append("oversharpen")
            p["oversharpen"] = q
        if rng.uniform() < cfg.overlay_text_prob:
            q = _sample_text(rng, cfg, h, w)
            x = overlay_text(x, **q)
            p["ops"].append("overlay_text")
            p["overlay_text"] = q
            p["lr_only_overlay"] = True
        if rng.uniform() < cfg.rescale_chain_prob:
            modes = cfg.rescale_modes
            steps = [{"scale": _uniform(rng, cfg.rescale_range), "down": str(modes[int(rng.integers(len(modes)))]),
                      "up": str(modes[int(rng.integers(len(modes)))])} for _ in range(_integer(rng, cfg.rescale_steps))]
            x = rescale_chain(x, steps)
            p["ops"].append("rescale_chain")
            p["rescale_chain"] = {"steps": steps}
        if rng.uniform() < cfg.chroma_prob:
            weights = np.asarray(cfg.chroma_factor_prob, dtype=np.float64)
            q = {"factor": int(cfg.chroma_factors[int(rng.choice(len(cfg.chroma_factors), p=weights / weights.sum()))])}
            x = chroma_subsample(x, **q)
            p["ops"].append("chroma_subsample")
            p["chroma_subsample"] = q
        if rng.uniform() < cfg.video_codec_prob:
            presets = cfg.x264_presets
            q = {"crf": _integer(rng, cfg.crf_range), "preset": str(presets[int(rng.integers(len(presets)))])}
            x = video_codec(x, **q)
            p["ops"].append("video_codec")
            p["video_codec"] = q
        outs.append(x)
        params.append(p)
    out = torch.cat(outs) if outs else base
    return out.clamp(0, 1), params
