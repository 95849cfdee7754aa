"""bench/gpu_e2e.py: its default GPU run is planned inside its budget, from the anchors and release tiling."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_e2e.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_e2e", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_e2e"] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def test_default_run_is_estimated_inside_the_default_budget(tmp_path):
    bench = load_bench()
    args = bench.parse_args(["--model-dir", str(tmp_path / "absent")])  # the build is counted in
    ctx = SimpleNamespace(args=args, workloads=bench.workloads(args), source=None)
    assert bench.print_plan(ctx) < args.budget_s


def test_release_tiling_of_a_1080p_image_at_x1():
    bench = load_bench()
    args = bench.parse_args([])
    x1 = bench.workloads(args)[0]
    # 8 tiles of 96x96 latents (2.25 units each) x 2 CFG branches x 3 steps x 6.6 ms, plus VAE and semantic.
    expected = (3 * 8 * 2.25 * 2 * bench.MS_PER_LATENT_64 + 1920 * 1080 / 1e6 * bench.VAE_MS_PER_MP
                + bench.SEMANTIC_MS) / 1000
    assert bench.seconds_per_image(x1, bench.model_config(x1, "bf16", args, None)) == pytest.approx(expected)
