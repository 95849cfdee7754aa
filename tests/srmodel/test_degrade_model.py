"""The two-branch degradation: the paper preset's frequencies, group quirk, determinism, recorded params."""

import json
import math

import numpy as np
import pytest
import torch

from srmodel.degrade import PRESETS, degrade_group, get_degrade_preset
from srmodel.degrade.kernels import sample_blur_kernel, sample_final_sinc

N = 2000


def within(count: int, n: int, p: float) -> bool:
    """count/n within 4 standard errors of p."""
    return abs(count / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def gt(g=1, size=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((g, 3, size, size), dtype=np.float32))


@pytest.mark.slow  # thousands of draws (~10 s)
def test_paper_branch_frequency():
    paper = PRESETS["paper"]
    x = gt()
    clean = sum(degrade_group(x, paper, seed)[2][0]["branch"] == "clean" for seed in range(N))
    assert within(clean, N, 0.5), clean


def test_paper_kernel_frequencies_and_the_box_blur_quirk():
    cfg = PRESETS["paper"].kernel1.model_dump()
    rng = np.random.default_rng(0)
    draws = [sample_blur_kernel(rng, cfg) for _ in range(N)]
    types = [p["type"] for _, p in draws]
    expected = {"sinc": 0.05, "iso": 0.95 * 0.6, "aniso": 0.95 * 0.2, "generalized_iso": 0.95 * 0.1,
                "generalized_aniso": 0.95 * 0.05, "plateau_iso": 0.95 * 0.05}
    for kind, p in expected.items():
        assert within(types.count(kind), N, p), (kind, types.count(kind))
    assert "plateau_aniso" not in types
    # Gaussian kernels at sigma 0.01-0.02 are deltas; generalized/plateau ones are near box blurs (~19 %)
    box = [k for k, p in draws if p["type"].startswith(("generalized", "plateau"))]
    assert within(len(box), N, 0.19)
    assert all(k.max() / k[k > 0].min() < 2.5 for k in box[:50])  # centre vs corner of the window
    deltas = [k for k, p in draws if p["type"] in ("iso", "aniso")]
    assert all(k.max() > 0.999 for k in deltas[:50])


def test_paper_final_sinc_frequency():
    rng = np.random.default_rng(1)
    types = [sample_final_sinc(rng, PRESETS["paper"].final_sinc_prob)[1]["type"] for _ in range(N)]
    assert within(sum(t == "sinc" for t in types), N, 0.4)


def test_group_draws_are_shared_per_image_draws_are_not():
    paper = PRESETS["paper"]
    for seed in range(40):
        _, lr, params = degrade_group(gt(10, 32), paper, seed)
        assert len({p["branch"] for p in params}) == 1
        if params[0]["branch"] == "degrade":
            assert len({json.dumps(p["resize1"]) for p in params}) == 1
            assert len({p["noise1"]["type"] for p in params}) == 1
            assert len({p["jpeg1"] for p in params}) > 1
            assert all(80 <= p["jpeg1"] <= 100 and 80 <= p["jpeg2"] <= 100 for p in params)
            return
    pytest.fail("no degrade branch in 40 seeds")


def test_deterministic_sizes_and_recorded_params():
    for name, cfg in PRESETS.items():
        target, lr, params = degrade_group(gt(2, 64), cfg, 7)
        target2, lr2, params2 = degrade_group(gt(2, 64), cfg, 7)
        assert torch.equal(lr, lr2) and torch.equal(target, target2) and params == params2
        assert lr.shape == (2, 3, 16, 16) and target.shape == (2, 3, 64, 64)
        assert torch.equal(lr, (lr * 255).round() / 255), "LR is 8-bit exact"
        json.dumps(params)  # every sampled parameter is recorded as plain JSON
        _, lr3, _ = degrade_group(gt(2, 64), cfg, 8)
        assert not torch.equal(lr, lr3), name


def test_clean_branch_is_plain_bicubic_and_realesrgan_always_degrades():
    from srmodel.degrade.ops import resize

    paper = PRESETS["paper"]
    x = gt(1, 32)
    seed = next(s for s in range(100) if degrade_group(x, paper, s)[2][0]["branch"] == "clean")
    _, lr, _ = degrade_group(x, paper, seed)
    expected = (resize(x, size=(8, 8), mode="bicubic").clamp(0, 1) * 255).round() / 255
    assert torch.equal(lr, expected)
    assert all(degrade_group(x, PRESETS["realesrgan"], s)[2][0]["branch"] == "degrade" for s in range(20))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown degradation preset"):
        get_degrade_preset("nope")
    with pytest.raises(ValueError, match="multiple of the scale"):
        degrade_group(gt(1, 30), PRESETS["paper"], 0)


def test_ugc_preset_adds_recorded_ugc_artefacts():
    ugc = PRESETS["ugc"]
    _, lr, params = degrade_group(gt(2, 64), ugc, 3)
    assert all("ugc" in p for p in params) and lr.shape == (2, 3, 16, 16)
    json.dumps(params)
    _, lr_plain, _ = degrade_group(gt(2, 64), PRESETS["realesrgan"], 3)
    assert not torch.equal(lr, lr_plain) or all(not p["ugc"]["ops"] for p in params)
