"""Where a run goes on from: RUN's checkpoints, and the data of the epoch a resume lands in.

A streaming run (not materialized) that resumes mid-epoch reads that epoch on from where its checkpoint left off,
instead of decoding the rows it already trained on and passing over them: Ray Train calls `RestOfEpoch` at every
worker-group start (the first, and each restart after a failure) for its "resume" dataset. It reads the newest
complete checkpoint in RUN, writes what it planned to RUN/resume_plan.json and returns that epoch's rest
(data.rest_of_epoch). A worker reads on from it only when the checkpoint Ray Train handed it is the planned one
(`reads_on`): Ray Train resumes from the last checkpoint its controller registered, which is the newest in RUN
except when a group died between a checkpoint's upload and its registration; and only when it was saved by as many
workers with the same batch size. Planning never fails a start (an error there would end the run): it falls back
to no plan. Otherwise, and in materialized runs (decoded once, so passing over costs no decoding and keeps the order
exact), the worker passes over the batches.
"""

from __future__ import annotations

import json
import logging
import posixpath

from cluster.storage import filesystem, join, read_bytes, write_bytes_atomic

from .data import dataset, rest_of_epoch
from .job import CHECKPOINT_FILES, CHECKPOINT_PREFIX, TrainJob

PLAN_FILE = "resume_plan.json"
log = logging.getLogger("ugcsr")


def checkpoints(job: TrainJob) -> dict[int, str]:
    """{step: path} of RUN's complete checkpoints (every file of one there: an upload cut short does not count)."""
    fs, root = filesystem(join(job.run, job.run_name), job.storage)
    files: dict[str, set] = {}
    for path in fs.glob(root.rstrip("/") + f"/{CHECKPOINT_PREFIX}*/*"):
        files.setdefault(posixpath.dirname(path), set()).add(posixpath.basename(path))
    found = {}
    for folder, names in files.items():
        step = posixpath.basename(folder)[len(CHECKPOINT_PREFIX):]
        if step.isdigit() and CHECKPOINT_FILES <= names:
            found[int(step)] = folder
    return found


def position(state: dict) -> dict:
    """A checkpoint's place in the data: what a plan and a worker's checkpoint must agree on."""
    return {k: int(state[k]) for k in ("step", "epoch", "samples_in_epoch")}


class RestOfEpoch:
    """Ray Train's "resume" dataset (a callable: called at each worker-group start, in Ray Train's controller)."""

    def __init__(self, job: TrainJob, paths: list[str], rows: list[int], tokenizer_folder: str, exclude: list[str]):
        self.job, self.paths, self.rows = job, paths, rows
        self.tokenizer_folder, self.exclude = tokenizer_folder, list(exclude)

    def __call__(self):
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # this process's context, as on the driver
        uri = join(self.job.run, PLAN_FILE)
        # No plan first: whatever fails below, no plan of an earlier start is left to match a worker's checkpoint.
        write_bytes_atomic(uri, b"null", self.job.storage)
        try:
            planned = self._plan()
            if planned:
                plan, left, skip = planned
                rest = dataset(self.job, left, self.tokenizer_folder, self.exclude + skip)
                write_bytes_atomic(uri, json.dumps(plan).encode(), self.job.storage)
                return rest
        except Exception:  # noqa: BLE001 - raised here it would end the run (Ray Train retries no controller error)
            log.exception("ugcsr: could not plan where the resumed epoch reads on; the workers pass over instead")
        # Without a plan no worker asks for this dataset; it is built (lazily, nothing runs) as Ray Train needs one.
        return dataset(self.job, self.paths, self.tokenizer_folder, self.exclude)

    def _plan(self) -> tuple[dict, list[str], list[str]] | None:
        """(plan, shards left, unit_ids to drop) from RUN's newest checkpoint, None when there is nothing to read on."""
        done = checkpoints(self.job)
        if not done:
            return None
        fs, _ = filesystem(self.job.run, self.job.storage)
        state = json.loads(fs.cat_file(posixpath.join(done[max(done)], "state.json")))
        if not state["samples_in_epoch"]:
            return None
        left, skip = rest_of_epoch(self.job, self.paths, self.rows, self.exclude, state["samples_in_epoch"])
        if not left:
            return None
        return {**position(state), "shards_left": len(left), "rows_dropped": len(skip)}, left, skip


def reads_on(job: TrainJob, state: dict | None, world: int) -> dict | None:
    """The plan when this worker's checkpoint `state` is the one RestOfEpoch planned from and was saved by as many
    workers with the same batch (so the epoch's rest is whole batches from where it stopped), else None: pass over.
    Every rank reads the same file, written before any started: they agree."""
    if job.materialize or state is None or not state["samples_in_epoch"]:
        return None
    if (state.get("world_size"), state.get("batch_size")) != (world, job.recipe.batch_size):
        return None
    plan = json.loads(read_bytes(join(job.run, PLAN_FILE), job.storage))
    return plan if plan and position(plan) == position(state) else None
