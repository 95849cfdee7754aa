"""`ugcsr report DST` drawn: one static HTML page about a run (Jinja2), its plots and pictures in a folder beside it.

No server and no internet: styles and the little script are inline, plots are
matplotlib PNGs and the gallery's thumbnails and crops are files in
`<report>_files/`, so the page and its folder can be copied anywhere. The
gallery shows a sample (never every image: corpora have millions) in pages.
What the page shows comes from `data`; its markup is the Jinja templates in
`templates/` (autoescaped: every value from a run is text, never markup).
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import math
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path

import jinja2
import numpy as np
from jinja2.ext import Extension
from PIL import Image

from cluster.storage import StorageConfig, read_bytes

from .data import (Evaluation, GalleryItem, Metrics, TrainingRun, UpscaleRun, is_training_run, load_training_run,
                   load_upscale_run, path_of)
from .scope import OutOfScope, ReadScope, local_overlap, src_root

THUMB = 360  # longest side of gallery thumbnails, px
MIN_SHOWN = 240  # thumbnails are displayed at least this large (px)
CROP = 96  # side of the zoomed crops, in output pixels (shown 2.5x, pixelated)


ASSETS_MARKER = ".ugcsr-report-assets"  # in every assets folder a report writes: only such a folder is ever replaced


class ReportOutError(ValueError):
    """--out cannot be written without harming something; the message names the folder and the way out."""


def build_report(target: str, out: str | Path, *, storage: StorageConfig | None = None, eval_dir: str | None = None,
                 gallery: int = 24, per_page: int = 8) -> dict:
    """Write the page for an upscale DST or a training run folder; returns what was written.

    Page and assets are built in a temporary folder beside `out` and renamed into place, so a report that
    fails leaves the previous one whole; an existing `<out>_files/` is replaced only when a report wrote it.
    """
    storage = storage or StorageConfig()
    out = Path(out)
    assets = out.parent / f"{out.stem}_files"
    around = {"DST": target, "--eval folder": eval_dir}
    _check_out(out, assets, {})  # an unrelated <out>_files/ is refused before the (maybe long) reading
    run = load_upscale_run(target, storage, eval_dir=eval_dir, gallery=gallery, per_page=per_page)
    training = None
    if run is not None:
        kind = "upscale run"
        around["SRC"] = run.src  # known from the run's summary
    elif is_training_run(target, storage):
        kind = "training run"
        training = load_training_run(target, storage)
    else:
        raise FileNotFoundError(f"{target} has neither an upscale manifest (_manifest/) nor training metrics "
                                "(metrics.parquet / checkpoints); give an upscale DST or a training run folder")
    _check_out(out, assets, around)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.stem}.report-", dir=out.parent))  # beside out: renames stay on one fs
    try:
        (tmp / "new").mkdir()
        staged = tmp / "new" / assets.name  # the same name: the page's links are right once it is moved
        staged.mkdir()
        (staged / ASSETS_MARKER).write_text(f"written by `ugcsr report` for {out.name}; the next report to that page "
                                            "replaces this folder\n", encoding="utf-8")
        page = _Page(staged)
        if run is not None:
            _upscale_sections(page, run, storage, per_page)
        else:
            _training_sections(page, training, per_page)
        (tmp / "new" / out.name).write_text(page.render(f"ugcsr report: {target}", kind, target), encoding="utf-8")
        _check_out(out, assets, around)  # again: <out>_files/ may have changed while the page was built
        _swap_in(tmp, out, assets)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # what was staged, and the previous assets moved in here
    return {"report": str(out), "assets": str(assets), "kind": kind, "gallery_items": page.gallery_items,
            "plots": page.plots}


def _check_out(out: Path, assets: Path, runs: dict[str, str | None]) -> None:
    """ReportOutError when writing out (page) and assets (its folder) could destroy something."""
    for what, uri in runs.items():
        for mine in (assets, out):
            if local_overlap(mine, uri):
                raise ReportOutError(
                    f"--out {out} would write {mine}, which is, holds or lies inside the run's {what} {uri}: the "
                    f"report replaces {assets.name}/ whole. Choose an --out outside the run's DST and SRC")
    if out.is_dir():
        raise ReportOutError(f"--out {out} is a folder; give the path of the HTML page to write (e.g. {out}.html)")
    if assets.is_symlink() or assets.exists():
        if assets.is_symlink() or not assets.is_dir() or not (assets / ASSETS_MARKER).is_file():
            raise ReportOutError(
                f"{assets} exists and was not written by `ugcsr report` (it has no {ASSETS_MARKER} file; reports "
                f"written before the marker have none either), and the report for --out {out} would replace it. "
                f"Choose another --out, or remove {assets} yourself if it is only an old report's folder")


def _swap_in(tmp: Path, out: Path, assets: Path) -> None:
    """Rename the staged assets and page (tmp/new/) over the previous ones; on a failure, put the previous back."""
    previous = tmp / "old"
    had = assets.exists()
    if had:
        os.rename(assets, previous)  # checked just before: a report's folder (it carries the marker)
    moved = False
    try:
        os.rename(tmp / "new" / assets.name, assets)
        moved = True
        os.replace(tmp / "new" / out.name, out)
    except BaseException:
        if moved:
            os.rename(assets, tmp / "failed")
        if had:
            os.rename(previous, assets)
        raise


# ---------------------------------------------------------------- page assembly

class _Page:
    """The sections so far (each rendered by the template named after its id), and the files written for them."""

    def __init__(self, assets: Path):
        self.assets = assets
        self.sections: list[dict] = []
        self.gallery_items = 0
        self.plots: list[str] = []

    def rel(self, path: Path) -> str:
        return f"{self.assets.name}/{path.relative_to(self.assets).as_posix()}"

    def add(self, anchor: str, title: str, **content) -> None:
        self.sections.append(dict(content, id=anchor, title=title))

    def plot(self, fig, name: str, alt: str) -> dict:
        import matplotlib.pyplot as plt

        path = self.assets / f"{name}.png"
        fig.savefig(path, dpi=96, bbox_inches="tight")
        plt.close(fig)
        self.plots.append(name)
        return {"name": name, "src": self.rel(path), "alt": alt}

    def render(self, title: str, kind: str, target: str) -> str:
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return _templates().get_template("page.html.j2").render(title=title, kind=kind, target=target, now=now,
                                                                sections=self.sections)


class _JoinLines(Extension):
    """Drops line breaks (and indentation) between tags in the HTML templates.

    They are there for reading: on the page, whitespace between inline-block cards, pager buttons or nav links
    would show as gaps. A line break next to text stays (it is a space there).
    """

    def preprocess(self, source: str, name: str | None, filename: str | None = None) -> str:
        if name and name.endswith(".html.j2"):
            return re.sub(r"(?<=[>}])[ \t]*\n\s*(?=[<{])", "", source)
        return source


@functools.cache
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("pipelines.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, extensions=[_JoinLines])
    env.filters["fmt"] = _fmt
    return env


def _fmt(v) -> str:
    """A table cell's value as text."""
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

def _upscale_sections(page: _Page, run: UpscaleRun, storage, per_page: int) -> None:
    page.add("settings", "Run settings", rows=run.settings)
    page.add("counts", "Counts by status", rows=run.counts)
    page.add("timing", "Throughput and stage times", throughput=_throughput_plot(page, run.throughput, run.finished),
             stages=_stages_plot(page, run.stage_ms), stage_rows=run.stage_stats)
    page.add("errors", "Errors", groups=run.errors)
    if run.evaluation is not None:
        page.add("metrics", "Metrics (evaluate)", evaluation=run.evaluation, psnr=_psnr_plot(page, run.evaluation))
    # Ground truth is read under the evaluation's GT too (where evaluate found it), else under SRC/DST only.
    gt_scope = run.scope.with_root(src_root(run.evaluation.gt)) if run.evaluation is not None else run.scope
    groups = [{"title": g.title, "gid": g.gid,
               "cards": [_card(page, item, storage, f"{g.gid}{i:04d}", run.scope, gt_scope)
                         for i, item in enumerate(g.items)]}
              for g in run.gallery]
    page.gallery_items = sum(len(g["cards"]) for g in groups)
    page.add("gallery", "Gallery", groups=groups, per_page=per_page)


def _throughput_plot(page: _Page, throughput: dict[str, np.ndarray], finished: dict[str, int]) -> dict | None:
    if not throughput:
        return None
    fig, ax = _new_fig()
    ax2 = ax.twinx()
    for run, secs in throughput.items():
        per = finished.get(run, len(secs)) / len(secs)  # rows each time stands for: 1, or more for a sample
        ax.step(secs, np.arange(1, len(secs) + 1) * per, where="post", marker="o", ms=3, label=f"run {run}: images done")
        if secs[-1] > 0:  # images/s in ~20 bins: the manifest is flushed in batches, so finer bins are noise
            bins = np.linspace(0, secs[-1], min(20, len(secs)) + 1)
            counts, edges = np.histogram(secs, bins=bins)
            ax2.bar(edges[:-1], counts * per / np.diff(edges), width=np.diff(edges), align="edge", alpha=0.25)
    if all(secs[-1] == 0 for secs in throughput.values()):
        ax.set_xlim(-1, 1)
        ax.text(0.5, 0.85, "every row of each run was written in one manifest flush:\nno finer timing to show",
                transform=ax.transAxes, ha="center", va="center", fontsize=9, color="#555")
    ax.set_xlabel("seconds since the run's first manifest row")
    ax.set_ylabel("images done (cumulative)")
    ax2.set_ylabel("images/s (bars)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Throughput over time")
    return page.plot(fig, "throughput", "images finished over time")


def _stages_plot(page: _Page, stage_ms: dict[str, np.ndarray]) -> dict | None:
    if not stage_ms:
        return None
    fig, ax = _new_fig()
    ax.boxplot(list(stage_ms.values()), showfliers=True)
    ax.set_xticks(range(1, len(stage_ms) + 1), list(stage_ms))
    ax.set_yscale("log")
    ax.set_ylabel("ms per image (log)")
    ax.set_title("Per-stage time per image")
    return page.plot(fig, "stages", "time per image in each stage")


def _psnr_plot(page: _Page, ev: Evaluation) -> dict | None:
    if not len(ev.psnr):
        return None
    fig, ax = _new_fig(6, 2.8)
    ax.hist(ev.psnr, bins=min(30, max(5, len(ev.psnr) // 2)))
    ax.set_xlabel("PSNR (dB, Y, crop 4)")
    ax.set_ylabel("images")
    ax.set_title("PSNR per image")
    return page.plot(fig, "psnr_hist", "histogram of PSNR per image")


# ---------------------------------------------------------------- gallery

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


def _card(page: _Page, item: GalleryItem, storage, stem: str, scope: ReadScope, gt_scope: ReadScope) -> dict:
    """One gallery card's files (thumbnails, crops) written; what its template shows.

    The row's URIs are data: only those under the run's SRC/DST are read (never a URL or file elsewhere).
    """
    row, ev_row = item.row, item.ev_row
    folder = page.assets / "gallery"
    folder.mkdir(exist_ok=True)
    name = posixpath.basename(path_of(row["dst_uri"]))
    why = item.why
    gt_uri = ev_row.get("gt_uri") if ev_row else None
    if gt_uri and not gt_scope.allows(gt_uri):
        gt_uri, why = None, f"{why} · ground truth not shown: not under the evaluation's GT or the run's SRC/DST"
    try:
        dst_uri, src_uri = scope.check(row["dst_uri"]), scope.check(row["src_uri"])  # both before any read
        out = _read_rgb(dst_uri, storage)
        src = _read_rgb(src_uri, storage)
        gt = _read_rgb(gt_uri, storage) if gt_uri else None
    except Exception as err:  # noqa: BLE001 - an unreadable file is a note in the gallery, not a failed report
        return {"name": name, "error": str(err)}
    h, w = out.shape[:2]
    bicubic = np.asarray(Image.fromarray(src).resize((w, h), Image.BICUBIC))
    scale = min(1.0, THUMB / max(h, w))
    fw, fh = max(1, round(w * scale)), max(1, round(h * scale))  # thumbnail file size
    shown = max(1.0, MIN_SHOWN / max(fw, fh))  # small outputs are shown enlarged (pixelated), never blurred
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
        crops.append({"src": page.rel(p), "side": round(side * 2.5), "label": label})
    metrics = ""
    if ev_row and ev_row.get("psnr") is not None:
        metrics = " · ".join(f"{k.upper()} {_fmt(ev_row[k])}" for k in ("psnr", "ssim", "lpips") if ev_row.get(k) is not None)
    return {"name": name, "error": None, "why": why, "src_w": src.shape[1], "src_h": src.shape[0], "w": w, "h": h,
            "metrics": metrics, "tw": round(fw * shown), "th": round(fh * shown), "input": files["in"],
            "output": files["out"], "gt": files.get("gt"), "crops": crops}


# ---------------------------------------------------------------- training runs

def _training_sections(page: _Page, run: TrainingRun, per_page: int) -> None:
    if run.settings is not None:
        name, settings = run.settings
        page.add("settings", f"Run settings ({name})", rows=list(settings.items()))
    page.add("loss", "Training loss", metrics=run.metrics,
             plot=_loss_plot(page, run.metrics) if run.metrics is not None and run.metrics.losses else None)
    if not run.validation:
        page.add("validation", "Validation images", cards=[], per_page=per_page)
        return
    folder = page.assets / "validation"
    folder.mkdir(exist_ok=True)
    cards, k = [], 0
    for ckpt, paths in run.validation.items():
        figures = []
        for p in paths[:12]:
            name = posixpath.basename(p)
            try:
                with Image.open(io.BytesIO(run.read(p))) as im:
                    im = im.convert("RGB")
                    im.thumbnail((THUMB, THUMB))
                    dest = folder / f"{k:05d}.jpg"
                    im.save(dest, quality=88)
            except Exception as err:  # noqa: BLE001 - an unreadable file is a note, not a failed report
                why = ("not a readable image" if isinstance(err, Image.UnidentifiedImageError)
                       else str(err) if isinstance(err, OutOfScope) else f"{type(err).__name__}: {err}")
                figures.append({"name": name, "error": why})
                continue
            k += 1
            figures.append({"name": name, "error": None, "src": page.rel(dest), "width": im.width, "height": im.height})
        cards.append({"checkpoint": ckpt, "images": len(paths), "figures": figures})
    page.gallery_items = k
    page.add("validation", "Validation images per checkpoint", cards=cards, per_page=per_page)


def _loss_plot(page: _Page, metrics: Metrics) -> dict:
    fig, ax = _new_fig()
    for c, v in metrics.losses.items():
        ax.plot(metrics.steps, v, lw=0.8, alpha=0.5 if len(v) > 50 else 1.0, label=c)
        if len(v) > 50:  # a moving average: raw diffusion losses are noise-dominated
            w = max(5, len(v) // 50)
            ax.plot(metrics.steps[w - 1:], np.convolve(np.nan_to_num(v), np.ones(w) / w, mode="valid"), lw=1.6,
                    label=f"{c} (mean of {w})")
    ax.set_xlabel(metrics.x or "row")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title("Training loss")
    return page.plot(fig, "loss", "training loss over steps")
