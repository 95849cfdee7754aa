"""The SR stage's GPU memory model: batches by GPU size and dtype, the user's max_batch wins, the counter."""

from __future__ import annotations

import types

import pytest
import torch

from srmodel.config import DEFAULT_MAX_BATCH, ModelSource, TilingConfig
from srmodel.presets import get_preset
from srmodel.sampling import memory_model as mm
from srmodel.sampling.live_bytes import LiveBytes, fused_attention

GB = 10**9
SOURCE = ModelSource(sd_base="/w/sd", seesr="/w/ckpt", sam2_checkpoint="/w/sam2.pt")


def test_constants_are_filled_in():
    assert all(v > 0 for v in mm.WEIGHTS.values()) and all(v > 0 for v in mm.VAE_DECODE.values())
    assert all(slope > 0 for slope, _ in mm.PER_ROW.values())
    assert mm.WEIGHTS["fp32"] == 2 * mm.WEIGHTS["fp16"] or abs(mm.WEIGHTS["fp32"] / mm.WEIGHTS["fp16"] - 2) < 0.01


def test_80_and_141_gb_pick_different_batches():
    small, big = mm.pick_max_batch(80 * GB), mm.pick_max_batch(141 * GB)
    assert 2 <= small < big
    assert small % 2 == 0 and big % 2 == 0  # CFG: a tile's two branches stay in one forward
    for gpu, rows in ((80, small), (141, big)):  # the largest that fits, and one more step does not
        budget = mm.FRACTION * gpu * GB
        assert mm.sr_gpu_bytes(rows) <= budget < mm.sr_gpu_bytes(rows + 2)


def test_fp32_weights_need_more_and_get_fewer_rows():
    assert mm.sr_gpu_bytes(16, "fp32") > mm.sr_gpu_bytes(16, "fp16")
    assert mm.sr_gpu_bytes(16, "bf16") == mm.sr_gpu_bytes(16, "fp16")
    assert mm.pick_max_batch(80 * GB, "fp32") < mm.pick_max_batch(80 * GB, "fp16")


def test_share_fused_semantic_and_cfg_off():
    full = mm.pick_max_batch(80 * GB)
    assert mm.pick_max_batch(80 * GB, share=0.5) < full
    assert mm.pick_max_batch(80 * GB, semantic=True) <= full
    assert mm.pick_max_batch(80 * GB, cfg=False) >= full
    assert mm.pick_max_batch(1 * GB) == 2 and mm.pick_max_batch(1 * GB, cfg=False) == 1  # never below one tile
    # smaller tiles (by area) hold more rows
    assert mm.pick_max_batch(80 * GB, tile=64) > full


def _fake_cuda(monkeypatch, total: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=total))


@pytest.mark.parametrize("gpu_gb", [80, 141])
def test_resolve_on_a_gpu_and_the_override_wins(monkeypatch, gpu_gb):
    _fake_cuda(monkeypatch, gpu_gb * GB)
    config = get_preset("wild", SOURCE)
    assert config.tiling.max_batch is None
    assert mm.resolve_max_batch(config, "cuda:0") == mm.pick_max_batch(gpu_gb * GB, "fp16", 96, cfg=True)
    user = config.model_copy(update={"tiling": TilingConfig(max_batch=6)})
    assert mm.resolve_max_batch(user, "cuda:0") == 6


def test_cpu_keeps_the_default():
    config = get_preset("wild", SOURCE)
    assert mm.resolve_max_batch(config, "cpu") == DEFAULT_MAX_BATCH == config.tiling.rows
    assert get_preset("tiny").tiling.max_batch == 16  # presets that set it keep it


def test_live_bytes_counts_outputs_until_they_are_freed():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 32, 32)
    counter = LiveBytes()
    with torch.no_grad(), counter:
        y = conv(x)
        z = torch.relu(y)
        view = z[:, :4]  # a view allocates nothing
        del y
        w = z * 2
    out = 2 * 16 * 32 * 32 * 4
    assert counter.peak == 2 * out  # y and z live together; w comes after y is freed
    assert counter.live == 2 * out and view.shape[1] == 4 and w.shape == z.shape


def test_fused_attention_counts_only_the_output_on_meta():
    q = torch.empty(2, 5, 9216, 64, device="meta", dtype=torch.float16)
    k = v = torch.empty(2, 5, 4096, 64, device="meta", dtype=torch.float16)
    counter = LiveBytes()
    with fused_attention(), counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.shape == q.shape and counter.peak == q.numel() * 2
