"""Evaluation stage: read an SR/GT pair, compute the challenge's metrics, or record why not."""

from __future__ import annotations

import time

import numpy as np

from cluster.storage import StorageConfig, read_bytes
from srmodel.metrics.challenge import psnr_y, ssim_y

from .batch import ensure_status_columns, fail, ok_rows, size
from .decode import DecodeError, decode_image

NR_NAMES = ("musiq", "maniqa", "clipiqa")


class SizeMismatch(ValueError):
    """SR and GT differ in size: full-reference metrics need the same pixel grid."""


class MetricsStage:
    """batch: `image`, `sr_uri`, `gt_uri` (+ error columns) -> `psnr`, `ssim`, `lpips`, NR metrics, sizes.

    Rows that already carry an error (unpaired GT) pass through with null metrics.
    LPIPS and the no-reference metrics are built once per actor, and only when
    their weights are on this node; `unavailable` (a JSON column) says why not.
    """

    def __init__(self, storage: dict | None = None, crop_border: int = 4, lpips: bool = True,
                 no_reference: bool = True, device: str | None = None, cpu_threads: int | None = None,
                 max_pixels: int = 64_000_000):
        from srmodel.metrics.learned import LPIPSAlex, NoReference

        from .device import pick_device, use_cpu_threads

        self.storage = StorageConfig.model_validate(storage or {})
        self.crop_border = crop_border
        self.max_pixels = max_pixels
        self.device = pick_device(device)
        use_cpu_threads(self.device, cpu_threads)
        self.unavailable: dict[str, str] = {}
        self.lpips = None
        if lpips:
            try:
                self.lpips = LPIPSAlex(self.device)
            except (OSError, ImportError, RuntimeError) as err:
                self.unavailable["lpips"] = str(err)
        else:
            self.unavailable["lpips"] = "disabled (--no-lpips)"
        self.nr = NoReference(list(NR_NAMES), self.device) if no_reference else None
        if self.nr is None:
            self.unavailable.update({n: "disabled (--no-nr)" for n in NR_NAMES})
        else:
            self.unavailable.update(self.nr.unavailable)

    def _load(self, uri: str, what: str) -> np.ndarray:
        try:
            data = read_bytes(uri, self.storage)
        except Exception as err:  # noqa: BLE001 - reported as this pair's error
            raise OSError(f"cannot read {what} {uri}: {err}") from err
        try:
            return decode_image(data, max_pixels=self.max_pixels)[0]
        except DecodeError as err:
            raise DecodeError(f"{what} {uri}: {err}") from err

    def __call__(self, batch: dict) -> dict:
        import json

        batch = ensure_status_columns(batch)
        n = size(batch)
        cols = {k: np.full(n, np.nan) for k in ("psnr", "ssim", "lpips", *NR_NAMES)}
        dims = {k: np.zeros(n, np.int32) for k in ("sr_width", "sr_height", "gt_width", "gt_height")}
        t_ms = np.zeros(n)
        for i in ok_rows(batch):
            t0 = time.perf_counter()
            try:
                sr = self._load(str(batch["sr_uri"][i]), "SR")
                gt = self._load(str(batch["gt_uri"][i]), "GT")
                dims["sr_height"][i], dims["sr_width"][i] = sr.shape[:2]
                dims["gt_height"][i], dims["gt_width"][i] = gt.shape[:2]
                if sr.shape != gt.shape:
                    raise SizeMismatch(f"size mismatch: SR {sr.shape[1]}x{sr.shape[0]} vs GT {gt.shape[1]}x{gt.shape[0]} "
                                     f"({batch['sr_uri'][i]}); SR must be exactly the GT's size")
                cols["psnr"][i] = psnr_y(sr, gt, self.crop_border)
                cols["ssim"][i] = ssim_y(sr, gt, self.crop_border)
                if self.lpips is not None:
                    cols["lpips"][i] = self.lpips(sr, gt)
                if self.nr is not None:
                    for name, value in self.nr(sr).items():
                        cols[name][i] = value
            except Exception as err:  # noqa: BLE001 - one bad pair is one error row
                stage = "read" if isinstance(err, OSError) else "decode" if isinstance(err, DecodeError) else "metrics"
                fail(batch, i, stage, err)
            t_ms[i] = (time.perf_counter() - t0) * 1000
        batch.update(cols)
        batch.update(dims)
        batch["t_metrics_ms"] = t_ms
        batch["unavailable"] = [json.dumps(self.unavailable, sort_keys=True)] * n
        return batch
