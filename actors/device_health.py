"""Which GPU an actor holds, and whether that GPU (not an image) is what keeps failing.

A fatal device error (a sticky CUDA error) ends the actor's process; Ray restarts it, usually on the same
GPU, because that GPU is the one just freed. Without a record of faults per GPU, a broken GPU restarts its
actor forever and every image sent to it is blamed in turn. The record (`DeviceRecord`, kept in the run's
crash journal) tells the two apart:

- a fault after which a fresh process cannot pass a self-test (`check_device`) or load the model is the
  GPU's: it is quarantined at once;
- otherwise the images are retried one at a time (guard.py) and an image that fails again is the
  culprit: its faults are struck from the GPU's record;
- a GPU that keeps failing without a batch finishing in between is quarantined too: device errors with
  `max_faults` disjoint sets of images, or `max_faults` images blamed there (one that fails under load
  but passes the self-test). A finished batch clears its record, so poison images spread over a long run
  never quarantine a good GPU.

Only errors the process reports (device errors, the self-test, the model load) count: a bare death (host
OOM, a native crash) is never held against a GPU. An actor on a quarantined GPU stops for good
(`DeviceQuarantined` in its constructor: Ray does not restart an actor whose constructor raised); new
actors avoid the GPU's node (Ray places by node, not by GPU).
"""

from __future__ import annotations

# Errors after which the device is unusable in this process (CUDA sticky errors are raised as
# torch.AcceleratorError); the actor must be replaced, not keep failing every later image.
FATAL_DEVICE_ERRORS = {"AcceleratorError"}


class DeviceQuarantined(RuntimeError):
    """This actor's GPU failed past the threshold; the actor stops instead of failing every image sent to it."""


def is_fatal_device_error(err: BaseException) -> bool:
    return type(err).__name__ in FATAL_DEVICE_ERRORS or (isinstance(err, RuntimeError) and "CUDA error" in str(err))


def device_location() -> dict | None:
    """{"node": Ray node id, "gpus": [GPU ids]} of this actor; None for an actor without a GPU (or outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        ctx = ray.get_runtime_context()
        gpus = [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]
        return {"node": ctx.get_node_id(), "gpus": gpus} if gpus else None
    except ImportError:
        return None


def device_keys(where: dict | None) -> list[str]:
    return [f"{where['node']}:gpu{g}" for g in where["gpus"]] if where else []


def describe(where: dict | None) -> str:
    return f"GPU {','.join(where['gpus'])} of node {where['node'][:12]}" if where else "this worker"


def check_device(device: str | None = None) -> None:
    """A fresh process's self-test of its GPU: a small computation, synchronised. Raises if the GPU is broken."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return
    x = torch.ones(256, 256, device=device or "cuda")
    if float((x @ x).sum()) != 256.0**3:
        raise RuntimeError("CUDA error: the device self-test computed a wrong result")
    torch.cuda.synchronize()


def _disjoint_sets(faults: list[frozenset]) -> int:
    """How many of the fault image sets are pairwise disjoint (greedy, smallest first: a whole batch's fault
    and a later fault of one of its images are one explanation, two single images two)."""
    taken: set = set()
    n = 0
    for images in sorted(faults, key=len):
        if images and not images & taken:
            taken |= images
            n += 1
    return n


class DeviceRecord:
    """Faults per GPU (key node:gpuN) for one run; plain Python, kept inside the crash journal actor."""

    def __init__(self, max_faults: int = 3):
        self.max_faults = max_faults
        self.faults: dict[str, list[frozenset]] = {}  # since the GPU's last finished batch
        self.blamed_here: dict[str, int] = {}  # images blamed for deaths there, since then
        self.total: dict[str, int] = {}
        self.state: dict[str, str] = {}  # key -> "suspect" | "quarantined" (absent: fine)
        self.reason: dict[str, str] = {}

    def _quarantine(self, key: str, error: str) -> None:
        self.state[key] = "quarantined"
        self.reason[key] = error[:300]

    def fault(self, keys: list[str], images: list[str], error: str) -> bool:
        """Record a fatal device error on these GPUs while `images` were processed; [] means a fresh process
        failed before any image. True when the GPU is now quarantined."""
        quarantined = False
        for key in keys:
            if self.state.get(key) != "quarantined":
                self.faults.setdefault(key, []).append(frozenset(images))
                self.total[key] = self.total.get(key, 0) + 1
                self.reason[key] = error[:300]
                if not images or _disjoint_sets(self.faults[key]) >= self.max_faults:
                    self._quarantine(key, error)
                else:
                    self.state[key] = "suspect"
            quarantined = quarantined or self.state[key] == "quarantined"
        return quarantined

    def passed(self, keys: list[str]) -> None:
        """A fresh process passed the self-test: no longer suspect (its faults stay counted)."""
        for key in keys:
            if self.state.get(key) == "suspect":
                del self.state[key]

    def blamed(self, image: str, died_on: list[str]) -> None:
        """`image` was found to be the culprit of deaths on the GPUs `died_on`: faults that involved it say
        nothing about any GPU, but a GPU where `max_faults` images were blamed in a row is the culprit itself."""
        for key, sets in self.faults.items():
            self.faults[key] = [s for s in sets if image not in s]
        for key in dict.fromkeys(died_on):
            self.blamed_here[key] = self.blamed_here.get(key, 0) + 1
            if self.blamed_here[key] >= self.max_faults and self.state.get(key) != "quarantined":
                self._quarantine(key, f"{self.blamed_here[key]} images in a row were blamed for deaths on it")

    def finished(self, keys: list[str]) -> None:
        """A batch finished on these GPUs: they work; what failed before was the images' or passing."""
        for key in keys:
            self.faults.pop(key, None)
            self.blamed_here.pop(key, None)

    def status(self, keys: list[str]) -> str:
        states = {self.state.get(k, "ok") for k in keys}
        return "quarantined" if "quarantined" in states else "suspect" if "suspect" in states else "ok"

    def quarantined_keys(self) -> set[str]:
        return {k for k, s in self.state.items() if s == "quarantined"}

    def excluded_nodes(self) -> list[str]:
        return sorted({k.rsplit(":gpu", 1)[0] for k in self.quarantined_keys()})

    def report(self) -> list[dict]:
        return [{"node": k.rsplit(":gpu", 1)[0], "gpu": k.rsplit(":gpu", 1)[1], "faults": self.total.get(k, 0),
                 "last_error": self.reason.get(k, "")} for k in sorted(self.quarantined_keys())]
