"""Metrics that need learned weights: LPIPS-Alex (torchmetrics) and the challenge's no-reference ones (pyiqa).

Both are used only when their weights are already on this machine: nothing is
downloaded. When a metric cannot be built, `unavailable` says why and its
values are reported as null with that reason, never faked.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet, looked up in the torch hub cache
# The challenge's no-reference metrics and their pyiqa names (MANIQA: the KonIQ-trained variant).
NR_METRICS = {"musiq": "musiq-koniq", "maniqa": "maniqa-koniq", "clipiqa": "clipiqa"}


def alexnet_weights_path() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def _to_tensor(rgb: np.ndarray, device: str):
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(device, torch.float32) / 255.0


class LPIPSAlex:
    """LPIPS v0.1 with the AlexNet backbone (the linear head ships inside torchmetrics)."""

    def __init__(self, device: str = "cpu"):
        path = alexnet_weights_path()
        if not path.exists():
            raise FileNotFoundError(
                f"AlexNet ImageNet weights not found at {path}; put {ALEXNET_FILE} there (or set TORCH_HOME) to get LPIPS"
            )
        try:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        except ImportError as err:
            raise ImportError(f"LPIPS needs torchmetrics ({err}); pip install torchmetrics") from err
        self.device = device
        # normalize=True: inputs in [0, 1], mapped to LPIPS's [-1, 1].
        self.metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, reduction="none").to(device)
        self.metric.eval()

    def __call__(self, sr: np.ndarray, gt: np.ndarray) -> float:
        import torch

        with torch.no_grad():
            value = self.metric(_to_tensor(sr, self.device), _to_tensor(gt, self.device))
        self.metric.reset()
        return float(value.reshape(-1)[0])


@contextlib.contextmanager
def _offline():
    """No hub downloads while building pyiqa metrics: only weights already cached count as present."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class NoReference:
    """MUSIQ (KonIQ), MANIQA (KonIQ), CLIPIQA through the optional `pyiqa` extra (non-commercial licence)."""

    def __init__(self, names: list[str], device: str = "cpu"):
        self.metrics: dict = {}
        self.unavailable: dict[str, str] = {}
        try:
            import pyiqa
        except ImportError:
            for name in names:
                self.unavailable[name] = ("the optional pyiqa extra is not installed (pip install 'ugcsr[iqa]'; "
                                          "pyiqa is under a non-commercial licence)")
            return
        self.device = device
        for name in names:
            try:
                with _offline():
                    self.metrics[name] = pyiqa.create_metric(NR_METRICS[name], device=device, as_loss=False)
            except Exception as err:  # noqa: BLE001 - missing weights surface as many error types
                self.unavailable[name] = f"pyiqa could not build {NR_METRICS[name]} from local weights: {type(err).__name__}: {err}"

    def __call__(self, sr: np.ndarray) -> dict[str, float]:
        import torch

        out = {}
        with torch.no_grad():
            for name, metric in self.metrics.items():
                out[name] = float(metric(_to_tensor(sr, self.device)).reshape(-1)[0])
        return out
