"""End to end on one GPU: the bare SR loop, the bare full loop and `run_upscale` on Ray, side by side.

    python3 bench/gpu_e2e.py                      # one H100/H200: the default run fits in ~8 min
    python3 bench/gpu_e2e.py --compile            # + torch.compile of UNet/ControlNet vs eager (needs more time)
    python3 bench/gpu_e2e.py --tiny               # CPU smoke run of this script (tiny model, 1 step)

Model: every part at its released size and layout with random weights (SD-2-base UNet,
ControlNet with its image-attention blocks, VAE, 49,408-token text encoder, SAM 2.1
hiera-tiny giving 4,096 tokens, RAM Swin-L + DAPE as the tagger), built once into
--model-dir by srmodel.tiny.write_released_layout(size="real"); or the real weights
with --weights DIR. Workloads: x1 (wild preset, CFG) on 1080p-like inputs written as
JPEG, and x4 (synthetic preset) on 480p-like inputs written as PNG. For each dtype:

  (a) bare SR loop: SRStage on decoded batches, SAM2 tokens and prompts precomputed;
  (b) bare full loop: read, decode, semantic, SR, encode + write in one process;
  (c) `run_upscale` on a local Ray (start-up included; steady rate from the first
      write batch on);

with --compile, (a) again with the UNet and ControlNet compiled: its rate, compile
time, recompilations and the output difference to eager. Each phase prints its
figures the moment they are measured and rewrites $OUT/gpu_e2e.json (or --json), so
a run cut short keeps what it measured. GPU busy is the mean NVML utilization
(pynvml, else nvidia-smi) sampled every 100 ms over the phase's steady window.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script: no PYTHONPATH needed
    sys.path.insert(0, str(ROOT))

# (module, what to install). A GPU machine's image may lack some: they travel as wheels (docs/performance.md).
REQUIRED = [
    ("torch", "torch"), ("numpy", "numpy"), ("PIL", "pillow"), ("pydantic", "pydantic"), ("yaml", "pyyaml"),
    ("fsspec", "fsspec"), ("pyarrow", "pyarrow"), ("pandas", "pandas"), ("ray", "ray"), ("ray.data", "ray[data]"),
    ("diffusers", "diffusers"), ("transformers", "transformers"), ("tokenizers", "tokenizers"),
    ("safetensors", "safetensors"), ("sam2", "sam2"), ("hydra", "hydra-core"), ("omegaconf", "omegaconf"),
    ("iopath", "iopath"), ("typer", "typer"), ("pipelines.upscale.run", "this repository's own modules"),
]

# Anchors (docs/performance.md, shared/reference/gpu_anchor): 13.2 ms per 512x512 image-step with CFG, bf16
# eager, batch 16, whole model = 6.6 ms per UNet+ControlNet pass over a 64x64 latent. Larger tiles are scaled
# by area (attention grows faster: an underestimate). The rest are rough and say so in the printed plan.
MS_PER_LATENT_64 = 6.6
VAE_MS_PER_MP = 40.0  # VAE decode per output megapixel, eager (rough)
SEMANTIC_MS = 20.0  # SAM2 hiera-t at 1024^2 + RAM Swin-L at 384^2 per image (rough; SAM2 alone 2.4 ms)
BUILD_S, LOAD_S, RAY_START_S, ACTOR_START_S, COMPILE_S = 150.0, 25.0, 20.0, 45.0, 150.0


@dataclass(frozen=True)
class Workload:
    name: str
    preset: str  # wild (x1, CFG) or synthetic (x4, no CFG)
    scale: int
    size: tuple[int, int]
    fmt: str


def say(*parts) -> None:
    print(*parts, flush=True)


def parse_size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


# ---------------------------------------------------------------- preflight


def preflight(args) -> dict:
    """Import every dependency and look at the GPU; one clear line and exit 2 if anything is missing."""
    versions, missing = {}, []
    for module, dist in REQUIRED:
        try:
            mod = importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - an ImportError deep inside a package counts as missing too
            missing.append(f"{dist} ({type(err).__name__}: {err})")
            continue
        versions[dist] = str(getattr(mod, "__version__", ""))
    if missing:
        raise SystemExit(f"preflight: missing {'; '.join(missing)}. On a GPU machine without them, carry wheels as "
                         "docs/performance.md says.")
    import torch

    info = {"python": sys.version.split()[0], "versions": {k: v for k, v in versions.items() if v}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    elif not args.tiny:
        raise SystemExit("preflight: no CUDA device visible to torch; this run needs one (or pass --tiny for CPU)")
    else:
        info["device"] = "cpu"
    if not args.tiny and not args.weights:
        check_builder(Path(args.model_dir))
    say(f"preflight ok: python {info['python']}, {info['device']}"
        + (f" ({info['device_memory_gib']} GiB, CUDA {info['cuda']})" if "cuda" in info else ""))
    say("  " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    return info


def check_builder(folder: Path) -> None:
    """The real-size release builder must exist unless --model-dir already holds a complete build."""
    from srmodel import tiny

    if (folder / "COMPLETE").is_file():
        return
    if "size" not in inspect.signature(tiny.write_released_layout).parameters:
        raise SystemExit("preflight: srmodel.tiny.write_released_layout has no size= parameter in this checkout, so "
                         "the real-size random release cannot be built; merge the branch that adds it, or pass "
                         "--weights DIR (the released weights), or --tiny")


# ---------------------------------------------------------------- model and inputs


def model_source(args):
    """The ModelSource of the run: --weights, else the real-size random release built into --model-dir once."""
    if args.tiny:
        return None  # the tiny preset builds its own
    from pipelines.cli.upscale import released_source

    if args.weights:
        return released_source(args.weights, "wild")
    folder = Path(args.model_dir)
    if not (folder / "COMPLETE").is_file():
        from srmodel import tiny

        say(f"building the real-size random release into {folder} (once; estimate {BUILD_S:.0f} s) ...")
        t = time.perf_counter()
        shutil.rmtree(folder, ignore_errors=True)  # a build cut short: start again (the builder wants an empty folder)
        tiny.write_released_layout(folder, size="real", dtype="fp16")
        (folder / "COMPLETE").write_text("real-size random, fp16\n")
        say(f"  built in {time.perf_counter() - t:.0f} s")
    return released_source(str(folder), "wild")


def model_config(w: Workload, dtype: str, args, source):
    from srmodel import get_preset

    if args.tiny:  # the tiny preset at this workload's scale; small working sizes keep CPU runs short
        cfg = get_preset("tiny")
        sampler = {"upscale": w.scale, "process_size": 32 if w.scale == 1 else 64}
    else:
        cfg = get_preset(w.preset, source)
        sampler = {}
    sampler.update(steps=args.steps, prompt_source="fixed" if args.tags == "fixed" else "tagger", fixed_tags="photo")
    return cfg.model_copy(update={"dtype": dtype, "sampler": cfg.sampler.model_copy(update=sampler)})


def make_inputs(folder: Path, n: int, size: tuple[int, int], seed: int) -> None:
    """Smooth random PNGs (upsampled noise: photo-like spectra, decode cost of real files)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for k in range(n):
        small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(folder / f"{k:04d}.png")


# ---------------------------------------------------------------- measuring


class GpuSampler:
    """Utilization (%) and memory used (MiB) every 100 ms with timestamps, for the whole run.

    Phases read their own window of it, so start-up and warm-up can be left out afterwards.
    NVML's utilization is the fraction of its last sample period (~1/6 s) with a kernel running.
    """

    def __init__(self, period_s: float = 0.1):
        self.samples: list[tuple[float, float, float]] = []
        self.period_s = period_s
        self.source = "none"
        self._stop = threading.Event()
        read = self._nvml_reader()
        if read:
            self.source = "pynvml"
            threading.Thread(target=self._poll, args=(read,), daemon=True).start()
        elif shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            threading.Thread(target=self._smi, daemon=True).start()

    @staticmethod
    def _nvml_reader():
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML here: try nvidia-smi
            return None

        def read():
            return (float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
        return read

    def _poll(self, read) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.samples.append((time.perf_counter(), *read()))
            except Exception:  # noqa: BLE001 - a missed sample, not a failed run
                pass

    def _smi(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
               "-lms", str(int(self.period_s * 1000))]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                if self._stop.is_set():
                    proc.terminate()
                    break
                try:
                    util, used = (float(x) for x in line.split(",")[:2])
                except ValueError:
                    continue
                self.samples.append((time.perf_counter(), util, used))

    def window(self, t0: float, t1: float) -> dict:
        """Busy fraction and peak memory used (whole device, every process) between t0 and t1."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not inside:
            return {"gpu_busy": None, "device_mem_peak_gib": None, "busy_samples": 0}
        return {"gpu_busy": round(sum(s[1] for s in inside) / len(inside) / 100, 3),
                "device_mem_peak_gib": round(max(s[2] for s in inside) / 1024, 2), "busy_samples": len(inside)}

    def stop(self) -> None:
        self._stop.set()


class Report:
    """Figures of every phase: printed as measured, and the JSON rewritten after each (a timeout keeps them)."""

    def __init__(self, path: Path | None, header: dict):
        self.path, self.data = path, {**header, "phases": [], "skipped": [], "notes": []}
        self.write()

    def phase(self, name: str, line: str, **figures) -> None:
        self.data["phases"].append({"phase": name, **figures})
        say(f"  {name:<34} {line}")
        self.write()

    def note(self, text: str, skipped: str | None = None) -> None:
        self.data["notes" if skipped is None else "skipped"].append(text if skipped is None else skipped)
        say(f"  note: {text}")
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)  # atomic: a run killed mid-write leaves the previous version


class Budget:
    """Wall-clock budget: a phase starts only if its estimate fits in what is left."""

    def __init__(self, seconds: float, report: Report):
        self.seconds, self.report, self.start = seconds, report, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, name: str, estimate_s: float) -> bool:
        left = self.seconds - self.elapsed()
        if estimate_s <= left:
            return True
        self.report.note(f"skipped {name}: estimated {estimate_s:.0f} s, {max(0.0, left):.0f} s of --budget-s left",
                         skipped=name)
        return False


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def fmt_busy(fig: dict) -> str:
    busy = "n/a" if fig["gpu_busy"] is None else f"{fig['gpu_busy']:.2f}"
    mem = f", peak {fig['peak_gib']:.1f} GiB" if fig.get("peak_gib") is not None else ""
    dev = f", device {fig['device_mem_peak_gib']:.1f} GiB" if fig.get("device_mem_peak_gib") is not None else ""
    return f"GPU busy {busy}{mem}{dev}"


# ---------------------------------------------------------------- estimates


def seconds_per_image(w: Workload, config) -> float:
    """From the anchors: denoising passes over this image's latent tiles, VAE decode and the semantic stage."""
    from srmodel.imaging.image_paths import image_path
    from srmodel.sampling.latent_tiles import plan_tiles

    s, tiling = config.sampler, config.tiling
    plan = image_path(config.geometry, s.upscale, s.process_size, tiling.pad_multiple).plan(*w.size)
    mw, mh = plan.model_size
    tiles = plan_tiles(mh // 8, mw // 8, tiling.latent_tile, tiling.latent_overlap, "release")
    units = sum(t.h * t.w for t in tiles) / 64**2 * (2 if s.cfg else 1)
    out_mp = plan.out_size[0] * plan.out_size[1] / 1e6
    return (s.steps * units * MS_PER_LATENT_64 + out_mp * VAE_MS_PER_MP + SEMANTIC_MS) / 1000


# ---------------------------------------------------------------- phases


class Bare:
    """The stage classes, loaded once per dtype and pointed at each workload's config (same weights).

    Only the sampler and tiling settings differ between the workloads' presets, and the stages read
    them from `config` on every call: loading the models once per dtype saves a reload per workload.
    """

    def __init__(self, config):
        from actors.decode import DecodeStage
        from actors.read import ReadStage
        from actors.semantic import SemanticStage
        from actors.sr import SRStage

        self.read, self.decode = ReadStage(), DecodeStage()
        self.sem, self.sr = SemanticStage(config), SRStage(config)

    def use(self, config) -> None:
        from srmodel.stages import resolve

        config = resolve(config).model_copy(update={"source": self.sr.config.source})
        self.sem.config = config
        self.sr.upscaler.config = config

    def semantic(self, chunk: list[dict]) -> dict:
        return self.sem(self.decode(self.read({k: [r[k] for r in chunk] for k in chunk[0]})))


def chunks(rows: list, n: int) -> list[list]:
    return [rows[i : i + n] for i in range(0, len(rows), n)]


def timed_sr(bare: Bare, batches: list[dict], sampler: GpuSampler) -> tuple[float, dict, list]:
    """(seconds, figures, SR images) of SRStage over `batches` (copied: the stage pops its inputs)."""
    reset_peak()
    t0 = time.perf_counter()
    outs = []
    for b in batches:
        outs += bare.sr(dict(b))["sr_image"]
    cuda_sync()
    t1 = time.perf_counter()
    return t1 - t0, {**sampler.window(t0, t1), "peak_gib": peak_gib()}, outs


def warm_up(bare: Bare, config, batch: dict) -> float:
    """One image at one step: kernels chosen, allocator grown, outside every clock (CPU: nothing to warm)."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    one = {k: v[:1] for k, v in batch.items()}
    bare.use(config.model_copy(update={"sampler": config.sampler.model_copy(update={"steps": 1})}))
    t = time.perf_counter()
    bare.sr(one)
    cuda_sync()
    bare.use(config)
    return time.perf_counter() - t


def phase_bare_sr(ctx, bare: Bare, w: Workload, config, batches: list[dict], tag: str) -> list:
    secs, fig, outs = timed_sr(bare, batches, ctx.sampler)
    n = sum(len(b["image_id"]) for b in batches)
    ctx.rates[(w.name, "sr")] = n / secs
    ctx.report.phase(f"{tag} (a) bare SR loop", f"{n / secs:8.3f} images/s  {fmt_busy(fig)}",
                     workload=w.name, dtype=config.dtype, images=n, seconds=round(secs, 3),
                     images_per_s=round(n / secs, 4), **fig)
    return outs


def phase_full_loop(ctx, bare: Bare, w: Workload, config, rows: list[dict], dst: Path, tag: str) -> None:
    from actors.write import WriteStage

    write = WriteStage(str(dst), w.fmt)
    reset_peak()
    t0 = time.perf_counter()
    for chunk in chunks(rows, ctx.args.batch):
        write(bare.sr(bare.semantic(chunk)))
    cuda_sync()
    t1 = time.perf_counter()
    fig = {**ctx.sampler.window(t0, t1), "peak_gib": peak_gib()}
    n = len(rows)
    ctx.report.phase(f"{tag} (b) bare full loop ({w.fmt})", f"{n / (t1 - t0):8.3f} images/s  {fmt_busy(fig)}",
                     workload=w.name, dtype=config.dtype, images=n, seconds=round(t1 - t0, 3),
                     images_per_s=round(n / (t1 - t0), 4), **fig)


def compare(a: list, b: list) -> dict:
    """Max and mean absolute difference of two lists of uint8 images (0..255)."""
    import numpy as np

    diffs = [np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)) for x, y in zip(a, b)]
    return {"max_abs_diff": int(max(d.max() for d in diffs)),
            "mean_abs_diff": round(float(np.mean([d.mean() for d in diffs])), 4)}


def bare_phases(ctx, dtype: str) -> None:
    """(a) and (b) for every workload at `dtype`, and (a) compiled with --compile."""
    configs = {w.name: model_config(w, dtype, ctx.args, ctx.source) for w in ctx.workloads}
    est = {w.name: seconds_per_image(w, configs[w.name]) * ctx.args.images for w in ctx.workloads}
    if not ctx.budget.allows(f"{dtype} bare loops", LOAD_S + 2 * sum(est.values())):
        return
    t = time.perf_counter()
    bare = Bare(configs[ctx.workloads[0].name])
    say(f"[{dtype}] stages loaded in {time.perf_counter() - t:.1f} s")
    compiled = False
    for w in ctx.workloads:
        cfg = configs[w.name]
        bare.use(cfg)
        rows = ctx.rows[w.name]
        t = time.perf_counter()
        batches = [bare.semantic(c) for c in chunks(rows, ctx.args.batch)]
        say(f"[{dtype}] {w.name}: semantic stage {time.perf_counter() - t:.1f} s for {len(rows)} images; "
            f"warm-up {warm_up(bare, cfg, batches[0]):.1f} s")
        tag = f"{dtype} {w.name}"
        if "a" in ctx.args.phases and ctx.budget.allows(f"{tag} (a)", est[w.name]):
            outs = phase_bare_sr(ctx, bare, w, cfg, batches, tag)
            ctx.outputs.setdefault(w.name, {})[dtype] = outs
        if "b" in ctx.args.phases and ctx.budget.allows(f"{tag} (b)", est[w.name] * 1.3):
            phase_full_loop(ctx, bare, w, cfg, rows, ctx.work / f"loop-{dtype}-{w.name}", tag)
        if ctx.args.compile and (w.name, "sr") in ctx.rates:
            compiled = phase_compiled(ctx, bare, w, cfg, batches, tag, compiled) or compiled
    del bare
    reset_peak()


# ---------------------------------------------------------------- torch.compile


def compile_models(bare: Bare) -> None:
    import torch

    up = bare.sr.upscaler
    # The denoiser calls unet(...) / controlnet(...) and reads .dtype: compiled modules forward both.
    up.unet = torch.compile(up.unet, mode=None, dynamic=None)
    up.controlnet = torch.compile(up.controlnet, mode=None, dynamic=None)


def dynamo_stats() -> dict:
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else None,
            "graph_breaks": sum(counters["graph_break"].values())}


def phase_compiled(ctx, bare: Bare, w: Workload, config, batches: list[dict], tag: str, already: bool) -> bool:
    """(a) again with UNet and ControlNet compiled: compile time, rate, output difference, graphs made so far.

    Shapes: latent tiles are 96x96 for every image above 768 px (release tiling) but the forward batch
    is the tile count x CFG branches chunked by max_batch, so the last chunk differs; torch.compile
    then recompiles once with a dynamic batch dimension (counted, not padded away).
    """
    if not ctx.budget.allows(f"{tag} (a) compiled", (0 if already else COMPILE_S) + ctx.args.images / ctx.rates[(w.name, "sr")]):
        return False
    if not already:
        compile_models(bare)
    before = dynamo_stats()
    t = time.perf_counter()
    timed_sr(bare, batches[:1], ctx.sampler)  # compiles every shape the timed loop meets (same batches)
    compile_s = time.perf_counter() - t
    secs, fig, outs = timed_sr(bare, batches, ctx.sampler)
    n = sum(len(b["image_id"]) for b in batches)
    after = dynamo_stats()
    eager = ctx.outputs.get(w.name, {}).get(config.dtype)
    diff = compare(eager, outs) if eager else {}
    ctx.report.phase(f"{tag} (a) compiled", f"{n / secs:8.3f} images/s  x{n / secs / ctx.rates[(w.name, 'sr')]:.2f} "
                     f"vs eager; first batch {compile_s:.0f} s; graphs {after['unique_graphs']} (+"
                     f"{after['unique_graphs'] - before['unique_graphs']}); diff max {diff.get('max_abs_diff')} mean "
                     f"{diff.get('mean_abs_diff')}  {fmt_busy(fig)}",
                     workload=w.name, dtype=config.dtype, images=n, seconds=round(secs, 3),
                     images_per_s=round(n / secs, 4), first_batch_s=round(compile_s, 1), dynamo=after, **diff, **fig)
    return True


# ---------------------------------------------------------------- Ray


def start_ray(ctx) -> None:
    import logging

    import ray
    import torch

    if ray.is_initialized():
        return
    t = time.perf_counter()
    # address="local": always a fresh local instance, whatever RAY_ADDRESS says; at least 4 CPU slots (see
    # cluster/ray_runtime.py: fewer stalls Ray Data).
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), num_gpus=torch.cuda.device_count() or None,
             include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    say(f"local Ray started in {time.perf_counter() - t:.1f} s")


def ray_phases(ctx, dtype: str) -> None:
    for w in ctx.workloads:
        cfg = model_config(w, dtype, ctx.args, ctx.source)
        rate = ctx.rates.get((w.name, "sr"))
        est = ACTOR_START_S + ctx.args.images * (1 / rate if rate else seconds_per_image(w, cfg)) * 1.3
        if ctx.budget.allows(f"{dtype} {w.name} (c) Ray", est + (0 if ctx.ray_started else RAY_START_S)):
            start_ray(ctx)
            ctx.ray_started = True
            phase_ray(ctx, w, cfg, f"{dtype} {w.name}")


def phase_ray(ctx, w: Workload, config, tag: str) -> None:
    from pipelines.upscale.job import UpscaleJob
    from pipelines.upscale.run import run_upscale

    b = ctx.args.batch
    job = UpscaleJob.model_validate({
        "src": str(ctx.work / f"src-{w.name}"), "dst": str(ctx.work / f"ray-{config.dtype}-{w.name}"),
        "model": config.model_dump(mode="json"), "format": w.fmt, "manifest_rows_per_file": b,
        "resources": {"sr_batch": b, "semantic_batch": b, "io_batch": 2 * b}})
    arrivals: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    summary = run_upscale(job, on_progress=lambda done, errors, total: arrivals.append((time.perf_counter(), done)))
    t1 = time.perf_counter()
    n = ctx.args.images
    if summary["by_status"] != {"ok": n}:
        raise RuntimeError(f"{tag} (c): {summary['by_status']} {summary.get('by_error_type')}")
    first_t, first_n = arrivals[0]
    last_t = arrivals[-1][0]
    steady = (n - first_n) / (last_t - first_t) if last_t > first_t else None
    # Busy over the steady window (first write batch to last); with one batch there is none: the whole run.
    fig = ctx.sampler.window(first_t, last_t) if steady else ctx.sampler.window(t0, t1)
    sr = ctx.rates.get((w.name, "sr"))
    ratio = f", steady/(a) {steady / sr:.2f}" if steady and sr else ""
    steady_txt = f"{steady:.3f}" if steady else "n/a"
    ctx.report.phase(f"{tag} (c) Ray run_upscale ({w.fmt})",
                     f"{n / (t1 - t0):8.3f} images/s with start-up; steady {steady_txt} images/s after the first "
                     f"batch at {first_t - t0:.1f} s{ratio}  {fmt_busy(fig)}",
                     workload=w.name, dtype=config.dtype, images=n, seconds=round(t1 - t0, 3),
                     images_per_s=round(n / (t1 - t0), 4), steady_images_per_s=steady and round(steady, 4),
                     first_batch_s=round(first_t - t0, 2), pools=summary.get("pools"),
                     stages=summary.get("stages"), **fig)


# ---------------------------------------------------------------- main


@dataclass
class Context:
    args: argparse.Namespace
    workloads: list
    work: Path
    source: object
    report: Report
    budget: Budget
    sampler: GpuSampler
    rows: dict
    rates: dict
    outputs: dict
    ray_started: bool = False


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (or GPU if present): a smoke run")
    ap.add_argument("--images", type=int, default=None, help="images per workload (default 4; --tiny 3)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 3; --tiny 1)")
    ap.add_argument("--batch", type=int, default=None, help="images per stage call (SR, semantic; default 2); "
                    "Ray io_batch 2x")
    ap.add_argument("--x1-size", default=None, help="x1 (wild) input WxH (default 1920x1080; --tiny 96x64)")
    ap.add_argument("--x4-size", default=None, help="x4 (synthetic) input WxH (default 854x480; --tiny 40x32)")
    ap.add_argument("--workloads", default="x1,x4", help="which of x1,x4 to run")
    ap.add_argument("--dtypes", default=None, help="comma list of bf16,fp16,fp32 (default bf16,fp16; --tiny fp32)")
    ap.add_argument("--phases", default="a,b,c", help="a: bare SR loop, b: bare full loop, c: Ray run_upscale")
    ap.add_argument("--tags", choices=["tagger", "fixed"], default="tagger",
                    help="tagger: RAM Swin-L + DAPE per image; fixed: the prompt 'photo' (no tagger cost)")
    ap.add_argument("--compile", action="store_true", help="also (a) with torch.compile'd UNet and ControlNet")
    ap.add_argument("--budget-s", type=float, default=480, help="skip phases whose estimate no longer fits")
    ap.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "ugcsr-real-size-fp16"),
                    help="where the real-size random release is built once (a COMPLETE file marks it)")
    ap.add_argument("--weights", default=None, help="use these released weights instead of building random ones")
    ap.add_argument("--json", default=None, help="figures file (default $OUT/gpu_e2e.json when OUT is set)")
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.images = args.images or (3 if tiny else 4)
    args.steps = args.steps or (1 if tiny else 3)
    # 2 write batches of the default images, so Ray's steady rate is defined; 2 images still fill the
    # UNet's batches of 16 on GPU (8 latent tiles per 1080p image x 2 CFG branches; 28 tiles per x4 image).
    args.batch = args.batch or 2
    args.x1_size = parse_size(args.x1_size or ("96x64" if tiny else "1920x1080"))
    args.x4_size = parse_size(args.x4_size or ("40x32" if tiny else "854x480"))
    args.dtypes = (args.dtypes or ("fp32" if tiny else "bf16,fp16")).split(",")
    return args


def workloads(args) -> list[Workload]:
    known = {"x1": Workload("x1", "wild", 1, args.x1_size, "jpeg"),
             "x4": Workload("x4", "synthetic", 4, args.x4_size, "png")}
    return [known[k] for k in args.workloads.split(",")]


def print_plan(ctx) -> float:
    """The phases' estimated seconds from the anchors, printed before anything heavy runs."""
    a = ctx.args
    per = {w.name: seconds_per_image(w, model_config(w, "bf16", a, ctx.source)) * a.images for w in ctx.workloads}
    built = a.tiny or a.weights or (Path(a.model_dir) / "COMPLETE").is_file()
    loops = sum(per.values()) * 2.3  # (a), (b) and semantic pre-pass
    ray = len(ctx.workloads) * ACTOR_START_S + sum(per.values()) * 1.3
    total = (0 if built else BUILD_S) + RAY_START_S + len(a.dtypes) * (LOAD_S + loops + ray)
    total += (COMPILE_S * len(a.dtypes) + sum(per.values())) if a.compile else 0
    say(f"estimate (anchors; tiny runs are not estimated): build {0 if built else BUILD_S:.0f} s; per dtype: load "
        f"{LOAD_S:.0f} s, bare loops {loops:.0f} s, Ray {ray:.0f} s; total {total:.0f} s for {len(a.dtypes)} dtype(s) "
        f"(budget {a.budget_s:.0f} s)")
    for w in ctx.workloads:
        say(f"  {w.name}: {a.images} x {w.size[0]}x{w.size[1]} -> x{w.scale}, {w.fmt}: ~{per[w.name]:.1f} s per pass")
    return total


def setup(args) -> Context:
    from pipelines.upscale.listing import list_inputs
    from cluster.storage import StorageConfig

    out = args.json or (str(Path(os.environ["OUT"]) / "gpu_e2e.json") if os.environ.get("OUT") else None)
    info = preflight(args)
    header = {"args": {k: v for k, v in vars(args).items()}, "env": info,
              "tags": ("fixed prompt 'photo' (no tagger)" if args.tags == "fixed" else
                       "RAM + DAPE (tiny)" if args.tiny else "RAM Swin-L + DAPE")}
    report = Report(Path(out) if out else None, header)
    work = Path(tempfile.mkdtemp(prefix="ugcsr-gpu-e2e-"))
    ctx = Context(args, workloads(args), work, None, report, Budget(args.budget_s, report), GpuSampler(), {}, {}, {})
    report.data["estimate_s"] = round(print_plan(ctx), 1)
    ctx.source = model_source(args)
    for k, w in enumerate(ctx.workloads):
        make_inputs(work / f"src-{w.name}", args.images, w.size, seed=k)
        ctx.rows[w.name] = list_inputs(str(work / f"src-{w.name}"), str(work / "dst"), StorageConfig(), w.fmt).to_pylist()
    say(f"model: {'tiny preset' if args.tiny else (args.weights or args.model_dir)}; tags: {header['tags']}; "
        f"{args.steps} step(s); GPU samples: {ctx.sampler.source}")
    return ctx


def dtype_diffs(ctx) -> None:
    """bf16 vs fp16 (a) outputs of the same images and seeds: how far the two dtypes drift."""
    for name, by_dtype in ctx.outputs.items():
        if len(by_dtype) > 1:
            (d1, o1), (d2, o2) = list(by_dtype.items())[:2]
            diff = compare(o1, o2)
            ctx.report.phase(f"{name} {d1} vs {d2} outputs", f"max abs diff {diff['max_abs_diff']}, mean "
                             f"{diff['mean_abs_diff']} (0..255)", workload=name, **diff)


def main(argv=None) -> int:
    args = parse_args(argv)
    t = time.perf_counter()
    ctx = setup(args)
    try:
        for dtype in args.dtypes:
            if "a" in args.phases or "b" in args.phases:
                bare_phases(ctx, dtype)
            if "c" in args.phases:
                ray_phases(ctx, dtype)
        dtype_diffs(ctx)
    finally:
        ctx.sampler.stop()
        ctx.report.data["wall_s"] = round(time.perf_counter() - t, 1)
        ctx.report.write()
        shutil.rmtree(ctx.work, ignore_errors=True)
    say(f"done in {time.perf_counter() - t:.0f} s; {len(ctx.report.data['phases'])} figure(s), "
        f"{len(ctx.report.data['skipped'])} phase(s) skipped" + (f"; figures in {ctx.report.path}" if ctx.report.path else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
