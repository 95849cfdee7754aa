"""`ugcsr train` throughput on CPU (tiny model, gloo): 1 worker vs 2 workers, side by side in one run.

    python bench/train_cpu.py [--steps 12] [--crop 64] [--batch 1]

Builds a small trainset with `build-trainset`, then trains the tiny model for --steps
optimizer steps with 1 and with 2 Ray Train workers (each worker one CPU, the decoded
set materialised so both runs read the same blocks). samples/s is the median over the
steps after the first two (start-up excluded). On a 2-core machine 2 workers cannot
scale: the ratio shows the DDP/gloo and data overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--crop", type=int, default=64, help="GT crop side (LR is crop / 4)")
    ap.add_argument("--batch", type=int, default=1, help="per worker per micro-batch")
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args()

    from inputs import rng_image
    from pipelines.build_trainset import TrainsetJob, run_build_trainset
    from pipelines.train.driver import run_train
    from pipelines.train.job import TrainJob
    from srmodel.presets import get_preset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "hr").mkdir()
        for k in range(args.images):
            rng_image(args.crop + 32, args.crop + 16, k).save(tmp / "hr" / f"{k:03d}.png")
        run_build_trainset(TrainsetJob.model_validate({"src": str(tmp / "hr"), "dst": str(tmp / "ts"), "crop": args.crop,
                                                       "min_pixels": 1, "min_file_bytes": 0}), num_cpus=4)
        results = {}
        for workers in (1, 2):
            job = TrainJob.model_validate({
                "trainset": str(tmp / "ts"), "run": str(tmp / f"run{workers}"),
                "model": get_preset("tiny").model_dump(mode="json"), "max_steps": args.steps,
                "checkpoint_every": args.steps, "val_images": 0, "workers": workers, "materialize": True,
                "decode_actors": 1, "decode_cpus": 0.25, "recipe": {"batch_size": args.batch, "grad_accum": 1},
            })
            summary = run_train(job, num_cpus=4, log=lambda _: None)
            import pyarrow.parquet as pq

            rows = pq.read_table(tmp / f"run{workers}" / "metrics.parquet").to_pylist()
            rates = [r["samples_per_s"] for r in rows[2:]] or [rows[-1]["samples_per_s"]]
            results[workers] = (statistics.median(rates), summary["wall_s"])
        print(f"{'workers':>8} {'samples/s':>10} {'wall s':>8}")
        for workers, (rate, wall) in results.items():
            print(f"{workers:>8} {rate:>10.3f} {wall:>8.1f}")
        print(f"ratio 2 workers / 1 worker: {results[2][0] / results[1][0]:.2f}x samples/s "
              f"(ideal 2.00x with a core per worker)")


if __name__ == "__main__":
    main()
