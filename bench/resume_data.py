"""A mid-epoch resume's data: reading the epoch on (RestOfEpoch) vs decoding it and passing over, side by side.

    python bench/resume_data.py [--pairs 96] [--shards 4] [--crop 256] [--done 0.75]

Builds a trainset of `--pairs` crops (build-trainset, the tiny model's tokenizer) on a local Ray, then times the
data of one resumed epoch as a training worker gets it (iter_torch_batches, batches of 2), `--done` of the epoch
already trained: (a) the whole epoch's stream, passing over the batches trained on (what a resume did before),
(b) the "resume" dataset Ray Train now gets (the shards trained on not read, the rows trained on dropped before
decoding). Each way runs twice, alternating, in one process; it prints rows decoded and wall time, and the ratios.
No training: the model is not loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--done", type=float, default=0.75, help="fraction of the epoch trained before the checkpoint")
    args = ap.parse_args()

    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from pipelines.build_trainset import TrainsetJob, run_build_trainset
    from pipelines.train.data import dataset, list_shards, row_counts, stream_order
    from pipelines.train.job import TrainJob
    from pipelines.train.resume import RestOfEpoch
    from srmodel.presets import get_preset
    from srmodel.stages import resolve
    from tests.support.inputs import rng_image

    root = Path(tempfile.mkdtemp(prefix="resume-bench-"))
    (root / "hr").mkdir()
    for k in range(args.pairs):
        rng_image(args.crop + 32, args.crop + 16, k).save(root / "hr" / f"{k:04d}.png")
    built = run_build_trainset(TrainsetJob.model_validate(
        {"src": str(root / "hr"), "dst": str(root / "ts"), "crop": args.crop, "min_pixels": 1, "min_file_bytes": 0,
         "shards": args.shards}))
    tokenizer = str(Path(resolve(get_preset("tiny")).source.sd_base) / "tokenizer")
    job = TrainJob.model_validate({"trainset": str(root / "ts"), "run": str(root / "run"), "max_steps": 1,
                                   "model": get_preset("tiny").model_dump(mode="json"), "val_images": 0,
                                   "recipe": {"batch_size": 2}, "shuffle": False})
    shards = list_shards(job.trainset, job.storage)
    paths, rows = stream_order(job, shards, row_counts(shards, job.storage, job.trainset))
    total = sum(rows)
    done = int(total * args.done) // 2 * 2
    folder = root / "run" / "train" / "checkpoint-00000001"  # the checkpoint RestOfEpoch plans from
    folder.mkdir(parents=True)
    for name in ("trainable.safetensors", "optimizer.pt", "rng.pt", "metrics.parquet"):
        (folder / name).write_bytes(b"")
    (folder / "state.json").write_text(json.dumps({"step": done // 2, "epoch": 0, "samples_in_epoch": done}))

    def epoch(ds, skip: int) -> tuple[int, float, int]:
        """Rows the worker trains on this epoch, the seconds to the end of it, rows the decode stage got."""
        t = time.perf_counter()
        got = 0
        for i, batch in enumerate(ds.iter_torch_batches(batch_size=2, drop_last=True)):
            if i >= skip:
                got += len(batch["key"])
        wall = time.perf_counter() - t
        ops = [op for op in ds._get_stats_summary().operators_stats if "TrainDecode" in op.operator_name]
        return got, wall, ops[0].total_input_num_rows

    print(f"trainset: {built['processed']['ok']} pairs of {args.crop} px in {len(paths)} shards; resume at "
          f"{done}/{total} rows of the epoch")
    results = {"pass over": [], "read on": []}
    for _ in range(2):
        results["pass over"].append(epoch(dataset(job, paths, tokenizer), done // 2))
        results["read on"].append(epoch(RestOfEpoch(job, paths, rows, tokenizer, [])(), 0))
    for way, runs in results.items():
        trained, wall, decoded = runs[-1][0], min(r[1] for r in runs), runs[-1][2]
        print(f"{way:>10}: rows decoded {decoded:4d}, rows trained {trained:4d}, wall {wall:6.2f} s "
              f"(runs: {', '.join(f'{r[1]:.2f}' for r in runs)})")
    a, b = results["pass over"], results["read on"]
    wall = min(r[1] for r in b) / min(r[1] for r in a)
    print(f"read on / pass over: rows decoded x{b[-1][2] / a[-1][2]:.2f}, wall x{wall:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
