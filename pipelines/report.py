"""`ugcsr report DST`: one static HTML page about a run, with its pictures and plots in a folder beside it.

No server and no internet: styles and the little script are inline, plots are
matplotlib PNGs and the gallery's thumbnails and crops are files in
`<report>_files/`, so the page and its folder can be copied anywhere. The
gallery shows a sample (never every image: corpora have millions) in pages.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import json
import math
import posixpath
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from cluster.storage import StorageConfig, filesystem, join, read_bytes

from .runfiles import latest_rows, read_run_manifest, read_run_summary

THUMB = 360  # longest side of gallery thumbnails, px
MIN_SHOWN = 240  # thumbnails are displayed at least this large (px)
CROP = 96  # side of the zoomed crops, in output pixels (shown 2.5x, pixelated)
STAGES = ("decode", "semantic", "sr", "encode")
# What the page uses of the manifest (prompts and tags stay on disk: the driver holds every row read).
MANIFEST_COLUMNS = ["image_id", "src_uri", "status", "stage", "error_type", "error_message", "dst_uri", "params_hash",
                    "model_id", "node_id", "timings_ms", "finished_at", "run"]


def build_report(target: str, out: str | Path, *, storage: StorageConfig | None = None, eval_dir: str | None = None,
                 gallery: int = 24, per_page: int = 8) -> dict:
    """Write the page for an upscale DST or a training run folder; returns what was written."""
    storage = storage or StorageConfig()
    out = Path(out)
    assets = out.parent / f"{out.stem}_files"
    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    page = _Page(assets)
    manifest = read_run_manifest(target, storage, columns=MANIFEST_COLUMNS)
    if manifest is not None:
        kind = "upscale run"
        _upscale_sections(page, target, manifest, storage, _load_eval(target, eval_dir, storage), gallery, per_page)
    elif _is_training_run(target, storage):
        kind = "training run"
        _training_sections(page, target, storage, per_page)
    else:
        raise FileNotFoundError(f"{target} has neither an upscale manifest (_manifest/) nor training metrics "
                                "(metrics.parquet / checkpoints); give an upscale DST or a training run folder")
    out.write_text(page.render(f"ugcsr report: {target}", kind, target), encoding="utf-8")
    return {"report": str(out), "assets": str(assets), "kind": kind, "gallery_items": page.gallery_items,
            "plots": page.plots}


# ---------------------------------------------------------------- page assembly

class _Page:
    def __init__(self, assets: Path):
        self.assets = assets
        self.sections: list[str] = []
        self.gallery_items = 0
        self.plots: list[str] = []

    def rel(self, path: Path) -> str:
        return f"{self.assets.name}/{path.relative_to(self.assets).as_posix()}"

    def add(self, title: str, body: str, anchor: str) -> None:
        self.sections.append(f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>')

    def plot(self, fig, name: str, alt: str) -> str:
        import matplotlib.pyplot as plt

        path = self.assets / f"{name}.png"
        fig.savefig(path, dpi=96, bbox_inches="tight")
        plt.close(fig)
        self.plots.append(name)
        return f'<img class="plot" id="plot-{name}" src="{self.rel(path)}" alt="{_e(alt)}">'

    def render(self, title: str, kind: str, target: str) -> str:
        nav = "".join(f'<a href="#{m}">{_e(t)}</a>' for m, t in re.findall(r'<section id="([^"]+)"><h2>([^<]+)</h2>',
                                                                           "".join(self.sections)))
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
                f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>"
                f"<header><h1>{_e(kind)}: <code>{_e(target)}</code></h1><p class=muted>generated {now} by "
                f"<code>ugcsr report</code></p><nav>{nav}</nav></header><main>{''.join(self.sections)}</main>"
                f"<script>{JS}</script></body></html>")


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _e(_fmt(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class _Raw(str):
    """Cell content that is already HTML."""


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _new_fig(w: float = 7.5, h: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h))


# ---------------------------------------------------------------- upscale runs

def _upscale_sections(page: _Page, dst: str, manifest, storage, evaluation, gallery: int, per_page: int) -> None:
    rows = manifest.to_pylist()
    latest = latest_rows(manifest)
    summary = read_run_summary(dst, storage) or {}
    _settings_section(page, dst, rows, summary)
    _counts_section(page, rows, latest)
    _timing_sections(page, rows)
    _errors_section(page, latest)
    if evaluation is not None:
        _eval_section(page, evaluation)
    _gallery_section(page, latest, evaluation, storage, gallery, per_page)


def _settings_section(page: _Page, dst: str, rows: list[dict], summary: dict) -> None:
    def distinct(col):
        c = Counter(r.get(col) for r in rows if r.get(col) is not None)
        return ", ".join(f"{k} ({n} rows)" for k, n in c.most_common(5)) or None

    items = [("DST", dst), ("SRC", summary.get("src")), ("preset", summary.get("preset")),
             ("params_hash", distinct("params_hash")), ("model_id", distinct("model_id")),
             ("runs", distinct("run")), ("nodes", distinct("node_id")),
             ("images in the last run's plan", summary.get("images")),
             ("last run wall time (s)", summary.get("wall_s")), ("last run images/s", summary.get("images_per_s")),
             ("pools", summary.get("pools"))]
    page.add("Run settings", _table(["setting", "value"], [[k, v] for k, v in items if v not in (None, "", {})]),
             "settings")


def _counts_section(page: _Page, rows: list[dict], latest: list[dict]) -> None:
    now = Counter(r.get("status") for r in latest)
    every = Counter(r.get("status") for r in rows)
    statuses = sorted(set(now) | set(every), key=str)
    table = _table(["status", "images (latest row each)", "manifest rows (all runs)"],
                   [[s, now.get(s, 0), every.get(s, 0)] for s in statuses] + [["total", len(latest), len(rows)]],
                   "counts")
    page.add("Counts by status", table, "counts")


def _timing_sections(page: _Page, rows: list[dict]) -> None:
    timed = sorted((r for r in rows if r.get("finished_at") is not None), key=lambda r: r["finished_at"])
    body = []
    if timed:
        fig, ax = _new_fig()
        by_run = defaultdict(list)
        for r in timed:
            by_run[r.get("run") or "run"].append(r["finished_at"])
        ax2 = ax.twinx()
        for run, times in by_run.items():
            t0 = times[0]
            secs = np.array([(t - t0).total_seconds() for t in times])
            ax.step(secs, np.arange(1, len(secs) + 1), where="post", marker="o", ms=3, label=f"run {run}: images done")
            if secs[-1] > 0:  # images/s in ~20 bins: the manifest is flushed in batches, so finer bins are noise
                bins = np.linspace(0, secs[-1], min(20, len(secs)) + 1)
                counts, edges = np.histogram(secs, bins=bins)
                ax2.bar(edges[:-1], counts / np.diff(edges), width=np.diff(edges), align="edge", alpha=0.25)
        if all(len(set(t)) == 1 for t in by_run.values()):
            ax.set_xlim(-1, 1)
            ax.text(0.5, 0.85, "every row of each run was written in one manifest flush:\nno finer timing to show",
                    transform=ax.transAxes, ha="center", va="center", fontsize=9, color="#555")
        ax.set_xlabel("seconds since the run's first manifest row")
        ax.set_ylabel("images done (cumulative)")
        ax2.set_ylabel("images/s (bars)")
        ax.legend(loc="upper left", fontsize=8)
        ax.set_title("Throughput over time")
        body.append(page.plot(fig, "throughput", "images finished over time"))
    stage_ms = {s: [r["timings_ms"][s] for r in rows if r.get("timings_ms") and r["timings_ms"].get(s)] for s in STAGES}
    stage_ms = {s: v for s, v in stage_ms.items() if v}
    if stage_ms:
        fig, ax = _new_fig()
        ax.boxplot(list(stage_ms.values()), showfliers=True)
        ax.set_xticks(range(1, len(stage_ms) + 1), list(stage_ms))
        ax.set_yscale("log")
        ax.set_ylabel("ms per image (log)")
        ax.set_title("Per-stage time per image")
        body.append(page.plot(fig, "stages", "time per image in each stage"))
        body.append(_table(["stage", "images", "mean ms", "p50 ms", "p95 ms"],
                           [[s, len(v), float(np.mean(v)), float(np.percentile(v, 50)), float(np.percentile(v, 95))]
                            for s, v in stage_ms.items()]))
    page.add("Throughput and stage times", "".join(body) or "<p>No timings in the manifest.</p>", "timing")


def _errors_section(page: _Page, latest: list[dict]) -> None:
    groups = defaultdict(list)
    for r in latest:
        if r.get("status") == "error":
            groups[(r.get("stage") or "?", r.get("error_type") or "?")].append(r)
    if not groups:
        page.add("Errors", "<p id=errors-none>No image is in error.</p>", "errors")
        return
    rows = []
    for (stage, etype), items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        messages = list(dict.fromkeys(r.get("error_message") or "" for r in items))[:3]
        inputs = [r.get("src_uri") or "" for r in items[:5]]
        rows.append([stage, etype, len(items), _Raw("<br>".join(f"<code>{_e(m[:300])}</code>" for m in messages)),
                     _Raw("<br>".join(f"<code>{_e(u)}</code>" for u in inputs)
                          + (f"<br>… and {len(items) - 5} more" if len(items) > 5 else ""))])
    page.add("Errors", _table(["stage", "error type", "images", "example messages", "inputs"], rows, "errors"), "errors")


# ---------------------------------------------------------------- evaluation

def _load_eval(dst: str, eval_dir: str | None, storage: StorageConfig) -> dict | None:
    folder = eval_dir or join(dst, "_eval")
    fs, path = filesystem(join(folder, "summary.json"), storage)
    if not fs.exists(path):
        if eval_dir:
            raise FileNotFoundError(f"--eval {eval_dir} holds no summary.json; run `ugcsr evaluate` first")
        return None
    import pyarrow.parquet as pq

    summary = json.loads(fs.cat_file(path))
    mfs, mpath = filesystem(join(folder, "metrics.parquet"), storage)
    table = pq.read_table(io.BytesIO(mfs.cat_file(mpath))) if mfs.exists(mpath) else None
    return {"dir": folder, "summary": summary, "rows": table.to_pylist() if table is not None else []}


def _eval_section(page: _Page, ev: dict) -> None:
    s = ev["summary"]
    means = s.get("means", {})
    body = [f"<p>From <code>{_e(ev['dir'])}</code>: SR <code>{_e(s.get('sr'))}</code> against GT "
            f"<code>{_e(s.get('gt'))}</code>. {_e(s.get('protocol', {}).get('psnr_ssim', ''))}</p>",
            _table(["metric", "mean", "missing because"],
                   [[m, means.get(m), s.get("missing", {}).get(m)] for m in means], "eval"),
            _table(["count", "value"], [[k, v] for k, v in s.get("counts", {}).items()]
                   + [[f"errors: {k}", v] for k, v in s.get("by_error_type", {}).items()]),
            f"<p>Challenge Score: <b>{_e(_fmt(s.get('score')))}</b> <span class=muted>{_e(s.get('score_note', ''))}</span></p>"]
    comp = s.get("comparison")
    if comp:
        cols = ["psnr", "ssim", "lpips", "musiq", "maniqa", "clipiqa"]
        body.append(f"<h3>Against the published numbers ({_e(comp['dataset'])})</h3>"
                    + _table(["method"] + cols, [[r["method"]] + [r.get(c) for c in cols] for r in comp["rows"]])
                    + f"<p class=muted>{_e(comp.get('note', ''))}</p>")
    psnr = [r["psnr"] for r in ev["rows"] if r.get("psnr") is not None and math.isfinite(r["psnr"])]
    if psnr:
        fig, ax = _new_fig(6, 2.8)
        ax.hist(psnr, bins=min(30, max(5, len(psnr) // 2)))
        ax.set_xlabel("PSNR (dB, Y, crop 4)")
        ax.set_ylabel("images")
        ax.set_title("PSNR per image")
        body.append(page.plot(fig, "psnr_hist", "histogram of PSNR per image"))
    page.add("Metrics (evaluate)", "".join(body), "metrics")


# ---------------------------------------------------------------- gallery

def _sample(rows: list[dict], n: int) -> list[dict]:
    """n rows spread evenly over the run, in a stable order (by image_id), never all of a huge run."""
    rows = sorted(rows, key=lambda r: r["image_id"])
    if len(rows) <= n:
        return rows
    idx = np.linspace(0, len(rows) - 1, n).round().astype(int)
    return [rows[i] for i in dict.fromkeys(idx.tolist())]


def _gallery_section(page: _Page, latest: list[dict], ev: dict | None, storage, gallery: int, per_page: int) -> None:
    ok = [r for r in latest if r.get("status") == "ok" and r.get("dst_uri")]
    by_dst = {}
    if ev:
        for r in ev["rows"]:
            if r.get("sr_uri"):
                by_dst[_path_of(r["sr_uri"])] = r
    picks = [(r, "sample") for r in _sample(ok, gallery)]
    worst = []
    if ev:
        scored = [(by_dst[_path_of(r["dst_uri"])], r) for r in ok if _path_of(r["dst_uri"]) in by_dst
                  and by_dst[_path_of(r["dst_uri"])].get("psnr") is not None]
        scored.sort(key=lambda x: x[0]["psnr"])
        worst = [(r, "lowest PSNR") for _, r in scored[:min(per_page, max(1, gallery // 3))]]
    body, n = [], 0
    for title, items, gid in (("Lowest PSNR", worst, "worst"), ("Sample", picks, "sample")):
        if not items:
            continue
        cards = []
        for i, (row, why) in enumerate(items):
            card = _card(page, row, by_dst.get(_path_of(row["dst_uri"])), storage, f"{gid}{i:04d}", why)
            cards.append(card)
        n += len(cards)
        body.append(f"<h3>{_e(title)} ({len(cards)})</h3>" + _paged(cards, per_page, gid))
    page.gallery_items = n
    intro = ("<p>Each card: the input upscaled with bicubic to the output size and the output, with a slider "
             "(drag to compare), and zoomed crops at the output's resolution (the most detailed spot).</p>")
    page.add("Gallery", intro + ("".join(body) or "<p>No finished image to show.</p>"), "gallery")


def _path_of(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _read_rgb(uri: str, storage) -> np.ndarray:
    from actors.decode import decode_image

    return decode_image(read_bytes(uri, storage))[0]


def _save(img: np.ndarray | Image.Image, path: Path, **kw) -> None:
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(path, **kw)


def _detail_spot(y: np.ndarray, side: int) -> tuple[int, int]:
    """Top-left of the side x side block with the most gradient energy (where differences show)."""
    h, w = y.shape
    if h <= side or w <= side:
        return 0, 0
    g = np.abs(np.diff(y, axis=0))[:, :-1] + np.abs(np.diff(y, axis=1))[:-1, :]
    step = max(1, side // 2)
    best, where = -1.0, (0, 0)
    for top in range(0, h - side, step):
        for left in range(0, w - side, step):
            e = float(g[top:top + side - 1, left:left + side - 1].mean())
            if e > best:
                best, where = e, (top, left)
    return where


def _card(page: _Page, row: dict, ev_row: dict | None, storage, stem: str, why: str) -> str:
    folder = page.assets / "gallery"
    folder.mkdir(exist_ok=True)
    name = posixpath.basename(_path_of(row["dst_uri"]))
    try:
        out = _read_rgb(row["dst_uri"], storage)
        src = _read_rgb(row["src_uri"], storage)
        gt = _read_rgb(ev_row["gt_uri"], storage) if ev_row and ev_row.get("gt_uri") else None
    except Exception as err:  # noqa: BLE001 - an unreadable file is a note in the gallery, not a failed report
        return f'<figure class="card missing"><figcaption>{_e(name)}: cannot show ({_e(err)})</figcaption></figure>'
    h, w = out.shape[:2]
    bicubic = np.asarray(Image.fromarray(src).resize((w, h), Image.BICUBIC))
    scale = min(1.0, THUMB / max(h, w))
    fw, fh = max(1, round(w * scale)), max(1, round(h * scale))  # thumbnail file size
    shown = max(1.0, MIN_SHOWN / max(fw, fh))  # small outputs are shown enlarged (pixelated), never blurred
    tw, th = round(fw * shown), round(fh * shown)
    files = {}
    for label, img in (("in", bicubic), ("out", out), ("gt", gt if gt is not None and gt.shape == out.shape else None)):
        if img is None:
            continue
        p = folder / f"{stem}_{label}.jpg"
        _save(Image.fromarray(img).resize((fw, fh), Image.LANCZOS), p, quality=88)
        files[label] = page.rel(p)
    side = min(CROP, h, w)
    top, left = _detail_spot(out.mean(axis=2), side)
    crops = []
    for label, img in (("input (bicubic)", bicubic), ("output", out), ("ground truth", gt if "gt" in files else None)):
        if img is None:
            continue
        p = folder / f"{stem}_crop_{label.split()[0]}.png"
        _save(img[top:top + side, left:left + side], p)
        crops.append(f'<figure><img class="crop" src="{page.rel(p)}" width="{round(side * 2.5)}" '
                     f'height="{round(side * 2.5)}" alt="{_e(label)} crop"><figcaption>{_e(label)}</figcaption></figure>')
    metrics = ""
    if ev_row and ev_row.get("psnr") is not None:
        metrics = " · ".join(f"{k.upper()} {_fmt(ev_row[k])}" for k in ("psnr", "ssim", "lpips") if ev_row.get(k) is not None)
    gt_img = (f'<img class="gt" src="{files["gt"]}" width="{tw}" height="{th}" alt="ground truth">' if "gt" in files else "")
    return (f'<figure class="card"><figcaption><b>{_e(name)}</b> <span class=muted>{_e(why)} · '
            f'{src.shape[1]}x{src.shape[0]} → {w}x{h}{" · " + _e(metrics) if metrics else ""}</span></figcaption>'
            f'<div class="pair"><div class="cmp" style="width:{tw}px;height:{th}px">'
            f'<img class="under" src="{files["out"]}" width="{tw}" height="{th}" alt="output">'
            f'<img class="over" src="{files["in"]}" width="{tw}" height="{th}" alt="input, bicubic">'
            f'<span class="tag tl">input</span><span class="tag tr">output</span>'
            f'<input type="range" min="0" max="100" value="50" aria-label="input | output"></div>{gt_img}</div>'
            f'<div class="legend muted">left of the line: input (bicubic) · right: output'
            f'{" · beside: ground truth" if gt_img else ""}</div><div class="crops">{"".join(crops)}</div></figure>')


def _paged(cards: list[str], per_page: int, gid: str) -> str:
    """Pages of cards; images on hidden pages carry data-src and load only when their page is shown."""
    pages = [cards[i:i + per_page] for i in range(0, len(cards), per_page)] or [[]]
    out = []
    for k, chunk in enumerate(pages):
        content = "".join(chunk)
        if k:
            content = content.replace(' src="', ' data-src="')
        out.append(f'<div class="page" data-page="{k}"{" hidden" if k else ""}>{content}</div>')
    buttons = "".join(f'<button type="button" data-goto="{k}"{" class=current" if not k else ""}>{k + 1}</button>'
                      for k in range(len(pages)))
    nav = f'<div class="pager">page {buttons}</div>' if len(pages) > 1 else ""
    return f'<div class="gallery" id="gallery-{gid}">{nav}{"".join(out)}</div>'


# ---------------------------------------------------------------- training runs

def _is_training_run(run: str, storage) -> bool:
    fs, root = filesystem(run, storage)
    if not fs.isdir(root):
        return False
    return fs.exists(root.rstrip("/") + "/metrics.parquet") or bool(fs.glob(root.rstrip("/") + "/checkpoint*"))


def _training_sections(page: _Page, run: str, storage, per_page: int) -> None:
    import pyarrow.parquet as pq

    fs, root = filesystem(run, storage)
    root = root.rstrip("/")
    for name in ("config.json", "train_config.json", "run.json", "summary.json"):
        if fs.exists(f"{root}/{name}"):
            try:
                data = json.loads(fs.cat_file(f"{root}/{name}"))
            except ValueError:
                continue
            flat = data if isinstance(data, dict) else {"value": data}
            page.add(f"Run settings ({name})", _table(["setting", "value"], [[k, v] for k, v in flat.items()]), "settings")
            break
    body = "<p>No metrics.parquet in this run.</p>"
    if fs.exists(f"{root}/metrics.parquet"):
        table = pq.read_table(io.BytesIO(fs.cat_file(f"{root}/metrics.parquet")))
        body = _loss_plot(page, table)
    page.add("Training loss", body, "loss")
    images = sorted(p for p in fs.find(root) if p.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))
                    and any("val" in part.lower() for part in p[len(root) + 1:].split("/")))
    groups = defaultdict(list)
    for p in images:
        rel = p[len(root) + 1:]
        ckpt = next((part for part in rel.split("/") if re.match(r"(checkpoint|step|ckpt|epoch)[-_=]?\d+", part, re.I)),
                    posixpath.dirname(rel) or ".")
        groups[ckpt].append(p)
    if not groups:
        page.add("Validation images", "<p>No validation images (PNG/JPEG under a folder named val*).</p>", "validation")
        return
    folder = page.assets / "validation"
    folder.mkdir(exist_ok=True)
    cards, k = [], 0
    for ckpt in sorted(groups, key=_natural):
        figs = []
        for p in groups[ckpt][:12]:
            try:
                with Image.open(io.BytesIO(fs.cat_file(p))) as im:
                    im = im.convert("RGB")
                    im.thumbnail((THUMB, THUMB))
                    dest = folder / f"{k:05d}.jpg"
                    im.save(dest, quality=88)
            except Exception as err:  # noqa: BLE001 - an unreadable file is a note, not a failed report
                why = "not a readable image" if isinstance(err, Image.UnidentifiedImageError) else f"{type(err).__name__}: {err}"
                figs.append(f"<figure><figcaption>{_e(posixpath.basename(p))}: cannot show ({_e(why)})</figcaption></figure>")
                continue
            k += 1
            figs.append(f'<figure><img src="{page.rel(dest)}" width="{im.width}" height="{im.height}" '
                        f'alt="{_e(posixpath.basename(p))}"><figcaption>{_e(posixpath.basename(p))}</figcaption></figure>')
        cards.append(f'<figure class="card"><figcaption><b>{_e(ckpt)}</b> <span class=muted>{len(groups[ckpt])} '
                     f'image(s)</span></figcaption><div class="crops">{"".join(figs)}</div></figure>')
    page.gallery_items = k
    page.add("Validation images per checkpoint", _paged(cards, per_page, "validation"), "validation")


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _loss_plot(page: _Page, table) -> str:
    cols = table.column_names
    x = "step" if "step" in cols else None
    numeric = [c for c in cols if c != x and str(table.schema.field(c).type) in ("double", "float", "int64", "int32")]
    losses = [c for c in numeric if "loss" in c.lower()] or numeric[:1]
    if not losses:
        return f"<p>metrics.parquet has no numeric column to plot (columns: {_e(cols)}).</p>"
    steps = np.asarray(table[x].to_pylist() if x else range(len(table)), dtype=float)
    fig, ax = _new_fig()
    for c in losses:
        v = np.asarray([np.nan if e is None else e for e in table[c].to_pylist()], dtype=float)
        ax.plot(steps, v, lw=0.8, alpha=0.5 if len(v) > 50 else 1.0, label=c)
        if len(v) > 50:  # a moving average: raw diffusion losses are noise-dominated
            w = max(5, len(v) // 50)
            ax.plot(steps[w - 1:], np.convolve(np.nan_to_num(v), np.ones(w) / w, mode="valid"), lw=1.6,
                    label=f"{c} (mean of {w})")
    ax.set_xlabel(x or "row")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title("Training loss")
    last = {c: table[c][len(table) - 1].as_py() for c in numeric}
    return page.plot(fig, "loss", "training loss over steps") + _table(["column", "last value"], list(last.items()))


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
header{background:#1d2b3a;color:#fff;padding:14px 24px}header h1{font-size:19px;margin:0}header code{color:#cfe3ff}
header .muted{color:#b7c4d3}nav a{color:#cfe3ff;margin-right:14px;text-decoration:none}nav{margin-top:6px}
main{padding:8px 24px 40px;max-width:1400px}section{background:#fff;border:1px solid #e1e5ea;border-radius:8px;
padding:12px 18px;margin:16px 0}h2{font-size:17px;margin:4px 0 10px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px}td,th{border:1px solid #e1e5ea;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f0f3f6}code{font-size:12px;word-break:break-all}.muted{color:#67717d}
img.plot{max-width:100%;display:block;margin:8px 0}.card{display:inline-block;vertical-align:top;margin:8px;
padding:8px;border:1px solid #e1e5ea;border-radius:6px;background:#fbfcfd;max-width:100%}.card figcaption{margin-bottom:6px}
.pair{display:flex;gap:8px;align-items:flex-start}.cmp{position:relative;overflow:hidden;flex:none}
.cmp img{position:absolute;top:0;left:0;display:block;image-rendering:pixelated}
.cmp .tag{position:absolute;top:3px;padding:0 4px;font-size:11px;background:#000a;color:#fff;border-radius:3px}
.cmp .tl{left:3px}.cmp .tr{right:3px}.gt{image-rendering:pixelated}.cmp .over{clip-path:inset(0 50% 0 0)}
.cmp input{position:absolute;bottom:4px;left:4%;width:92%;margin:0}.crops{display:flex;gap:8px;flex-wrap:wrap;margin-top:6px}
.crops figure{margin:0}.crop{image-rendering:pixelated;border:1px solid #ccd}.legend{font-size:12px;margin-top:4px}
.pager button{margin:0 2px;padding:2px 9px;border:1px solid #c9d1da;background:#fff;border-radius:4px;cursor:pointer}
.pager button.current{background:#1d2b3a;color:#fff}.missing{color:#a33}
"""

JS = """
document.querySelectorAll('.cmp input').forEach(function (r) {
  r.addEventListener('input', function () {
    r.parentElement.querySelector('.over').style.clipPath = 'inset(0 ' + (100 - r.value) + '% 0 0)';
  });
});
document.querySelectorAll('.gallery').forEach(function (g) {
  g.querySelectorAll('.pager button').forEach(function (b) {
    b.addEventListener('click', function () {
      g.querySelectorAll('.page').forEach(function (p) {
        var show = p.dataset.page === b.dataset.goto;
        p.hidden = !show;
        if (show) p.querySelectorAll('img[data-src]').forEach(function (i) {
          i.src = i.dataset.src; i.removeAttribute('data-src');
        });
      });
      g.querySelectorAll('.pager button').forEach(function (o) { o.classList.toggle('current', o === b); });
    });
  });
});
"""
