"""Peak host memory (RSS) of each stage at real size on CPU: load + one batch, each in its own process.

    flock /tmp/realsize.lock python3 bench/stage_memory.py --weights /work/realsize/fp16 [--json out.json]
        [--stages semantic,tagger,sr,train] [--process-size 256] [--limit-gb 17.5]

Weights: a release folder (`python -m srmodel.tiny DIR --size real --dtype fp16` writes a random one).
Each stage runs in a fresh child process (`python3 bench/stage_memory.py --child STAGE DTYPE ...`), so
peaks never mix: the child reports its RSS after the imports, its peak after loading (ru_maxrss then)
and its peak after one batch; the parent also reads the child's ru_maxrss from wait4 and polls
/proc/PID/status, killing a child whose RSS passes --limit-gb (reported as `killed`).

- semantic: SAM 2.1 hiera-tiny encoder (fp32 on every device, as released), one image (-> 1024² inside).
- tagger: RAM Swin-L + DAPE (fp32 as released), one image (384² inside).
- sr: the upscaler (UNet + ControlNet + VAE + text encoder) in fp32 and fp16 (the presets' dtype; bf16 has
  fp16's size), one image through the wild preset (CFG: 2 UNet rows) with 1 step at --process-size
  (default 256: a 32x32 latent; on a GPU the batch's activations live in GPU memory, not here).
- train: `load_train_parts` + AdamW + one optimizer step at batch 1 on a 256² GT crop, gradient
  checkpointing, bf16 autocast with bf16 frozen parts (what `mixed_precision: auto` picks on CUDA).
  The fp32 variant (frozen parts fp32, no autocast: what a CPU worker runs) needs ≈ 20 GB and is
  left out unless asked for (`--train-fp32`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(stage: str, dtype: str, weights: str, process_size: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from pipelines.cli.upscale import released_source
    from srmodel import stages
    from srmodel.presets import get_preset

    torch.manual_seed(0)
    out = {"stage": stage, "dtype": dtype, "threads": torch.get_num_threads()}
    config = get_preset("wild", released_source(weights, "wild"))
    config = config.model_copy(update={"dtype": dtype, "sampler": config.sampler.model_copy(
        update={"steps": 1, "process_size": process_size})})
    image = np.random.default_rng(0).integers(0, 256, (process_size, process_size, 3), dtype=np.uint8)
    out["import_rss"] = _rss()
    t = time.perf_counter()

    def loaded() -> float:  # the load's figures, printed at once: what is known if the batch is cut short
        out.update(load_peak=_maxrss(), loaded_rss=_rss(), load_s=time.perf_counter() - t)
        print(json.dumps(out), flush=True)
        return time.perf_counter()

    if stage in ("semantic", "tagger"):
        model = stages.load_semantic_encoder(config) if stage == "semantic" else stages.load_tagger(config)
        t = loaded()
        with torch.no_grad():
            model.encode([image]) if stage == "semantic" else model([image])
    elif stage == "sr":
        from srmodel.sampling.live_bytes import LiveBytes
        from srmodel.upscaler import SRRequest

        model = stages.load_upscaler(config)
        t = loaded()
        tokens = torch.randn(4096, 256)
        counter = LiveBytes()  # the tensors the batch allocates, counted at the dispatcher (cross-check of RSS)
        with torch.no_grad(), counter:
            model.upscale([SRRequest(image, tokens, "a dog on the grass", 0)])
        out["batch_tensor_peak"] = counter.peak
    elif stage == "train":
        from srmodel.train import Trainer, load_train_parts
        from srmodel.train.config import TrainRecipe

        amp = dtype != "fp32"
        recipe = TrainRecipe(batch_size=1, grad_accum=1, optimizer="adamw", gradient_checkpointing=True,
                             mixed_precision=dtype if amp else "no", frozen_dtype=dtype)
        parts = load_train_parts(stages.resolve(config), recipe, "cpu")
        trainer = Trainer(parts, recipe, "cpu")
        t = loaded()
        crop = 256
        gt = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, crop, crop, 3), dtype=np.uint8))
        ids = parts.text.tokenizer(["a dog"], padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
        batch = {"key": torch.tensor([0]), "gt": gt, "lr_up": gt.clone(), "input_ids": ids}
        out["loss"] = trainer.accumulate([batch], [0])
        trainer.step()
        out["trainable_params"] = sum(p.numel() for p in trainer.params)
    else:
        raise ValueError(stage)
    out.update(batch_s=time.perf_counter() - t, peak=_maxrss(), final_rss=_rss())
    return out


def run_child(stage: str, dtype: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, dtype, "--weights", args.weights,
           "--process-size", str(args.process_size)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        polled, killed = 0, False
        while True:  # wait4 (not Popen.poll, which would reap the child first) gives the child's own ru_maxrss
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        polled = max(polled, int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                pass
            if not killed and (polled > args.limit_gb * GB or time.perf_counter() - t > args.timeout_s):
                proc.kill()
                killed = f"RSS passed --limit-gb {args.limit_gb}" if polled > args.limit_gb * GB else \
                    f"ran past --timeout-s {args.timeout_s}"
            time.sleep(0.25)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    rec = {"stage": stage, "dtype": dtype, "wall_s": round(time.perf_counter() - t, 1),
           "child_maxrss": usage.ru_maxrss * 1024, "polled_peak": polled}
    if killed:
        rec["killed"] = killed
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if lines:
        rec.update(json.loads(lines[-1]))
    elif not killed:
        rec["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {status}"
    return rec


def table(records: list[dict]) -> str:
    head = f"{'stage':<9} {'dtype':<5} {'after import':>12} {'load peak':>10} {'loaded':>8} {'batch peak':>10} " \
           f"{'load s':>7} {'batch s':>8}"
    rows = [head]
    for r in records:
        def g(k):
            return f"{r[k] / GB:.2f}" if k in r else "-"
        peak = g("peak") if "peak" in r else g("polled_peak") + " killed"
        rows.append(f"{r['stage']:<9} {r['dtype']:<5} {g('import_rss'):>12} {g('load_peak'):>10} {g('loaded_rss'):>8} "
                    f"{peak:>10} {r.get('load_s', 0):>7.1f} {r.get('batch_s', 0):>8.1f}"
                    + (f"  ERROR {r['error']}" if r.get("error") else ""))
    rows.append("GB = 1e9 bytes; peaks are the child's own ru_maxrss (load peak: after loading; batch peak: after "
                "load + one batch); a killed child shows the peak polled from /proc")
    return "\n".join(rows)


# (stage, dtype) in the order run: the GPU dtypes first, fp32 SR (a CPU actor's) last.
PLAN = [("semantic", "fp32"), ("tagger", "fp32"), ("sr", "fp16"), ("train", "bf16"), ("sr", "fp32")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="/work/realsize/fp16")
    ap.add_argument("--stages", default="semantic,tagger,sr,train")
    ap.add_argument("--process-size", type=int, default=256)
    ap.add_argument("--limit-gb", type=float, default=17.5)
    ap.add_argument("--train-fp32", action="store_true")
    ap.add_argument("--timeout-s", type=float, default=240, help="per child; a killed child keeps its load figures")
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "DTYPE"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.weights, args.process_size)), flush=True)
        return
    records = []
    wanted = args.stages.split(",")
    for stage, dtype in PLAN + ([("train", "fp32")] if args.train_fp32 else []):
        if stage in wanted:
            rec = run_child(stage, dtype, args)
            records.append(rec)
            print(json.dumps(rec), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"weights": args.weights, "process_size": args.process_size,
                                                       "records": records}, indent=1))
    print(table(records))


if __name__ == "__main__":
    main()
