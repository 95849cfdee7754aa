"""Stage classes without Ray: bad input isolation, retries, output naming."""

import io

import numpy as np
import pytest

from actors.decode import DecodeStage
from actors.read import ReadStage
from actors.sr import SRStage
from actors.write import WriteStage, encode_image
from tests.support.inputs import write_inputs
from pipelines.paths import output_key
from srmodel import get_preset


def test_decode_stage_isolates_every_bad_input(tmp_path):
    expect = write_inputs(tmp_path / "in")
    names = sorted(expect)
    batch = {"image_id": names, "src_uri": [f"file://{tmp_path}/in/{n}" for n in names],
             "bytes": [(tmp_path / "in" / n).read_bytes() for n in names]}
    out = DecodeStage(max_pixels=50_000)(batch)
    for i, name in enumerate(names):
        kind, value = expect[name]
        if kind == "ok":
            assert not out["error_type"][i], (name, out["error_message"][i])
            assert out["image"][i].shape == (value[1], value[0], 3) and out["image"][i].dtype == np.uint8
        else:
            assert out["error_type"][i] == value and out["stage"][i] == "decode"
            assert name in out["error_message"][i]
    assert "bytes" not in out


def test_rgba_is_composited_on_white_and_exif_applied(tmp_path):
    from PIL import Image

    transparent = Image.new("RGBA", (4, 3), (255, 0, 0, 0))
    buf = io.BytesIO()
    transparent.save(buf, "PNG")
    out = DecodeStage()({"image_id": ["a"], "src_uri": ["x"], "bytes": [buf.getvalue()]})
    assert (out["image"][0] == 255).all()


def test_read_stage_turns_missing_objects_into_rows(tmp_path):
    ok = tmp_path / "ok.png"
    ok.write_bytes(b"data")
    batch = {"image_id": ["1", "2"], "src_uri": [str(ok), str(tmp_path / "gone.png")]}
    out = ReadStage()(batch)
    assert out["bytes"][0] == b"data" and out["src_bytes"][0] == 4 and not out["error_type"][0]
    assert out["error_type"][1] == "FileNotFoundError" and out["stage"][1] == "read"
    assert "gone.png" in out["error_message"][1]


@pytest.mark.parametrize("src,expected", [
    ("a/b/photo.jpg", "a/b/photo.png"),
    ("../../x.jpg", "x.png"),
    ("/etc/passwd.jpg", "etc/passwd.png"),
    ("a/../../../b.JPG", "a/b.png"),
    ("we ird/na\u0000me\u202e.jpg", "we_ird/na_me_.png"),
    ("ｆｕｌｌ/ǅ.png", "full/Dž.png"),
    ("..", "_.png"),
])
def test_output_keys_never_escape(src, expected):
    key = output_key(src, "png")
    assert key == expected
    assert not key.startswith("/") and ".." not in key.split("/")


def test_write_stage_formats(tmp_path):
    img = np.full((6, 5, 3), 128, np.uint8)
    for fmt in ("png", "webp", "jpeg"):
        assert len(encode_image(img, fmt)) > 0
    with pytest.raises(ValueError, match="unknown output format"):
        WriteStage(str(tmp_path), fmt="bmp")
    out = WriteStage(str(tmp_path))({"image_id": ["a", "b"], "sr_image": [img, img], "dst_key": ["x/a.png", "b.png"],
                                     "error_type": ["", "DecodeError"], "error_message": ["", "bad"], "stage": ["", "decode"]})
    assert (tmp_path / "x" / "a.png").is_file() and not (tmp_path / "b.png").exists()
    assert out["status"] == ["ok", "error"] and out["dst_width"][0] == 5 and "sr_image" not in out
    assert not list(tmp_path.rglob("*.tmp")), "no temp files left behind"


def test_sr_stage_isolates_an_image_that_fails(tiny_cache, monkeypatch):
    stage = SRStage(get_preset("tiny").model_copy(update={"sampler": get_preset("tiny").sampler.model_copy(update={"steps": 1})}))
    good = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    bad = good.copy()
    tokens = np.zeros((256, 256), np.float16)
    real = stage.upscaler.upscale

    def upscale(requests, deadline=None):
        if any(r.image.shape == (9, 9, 3) for r in requests):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(requests, deadline)

    monkeypatch.setattr(stage.upscaler, "upscale", upscale)
    bad = np.zeros((9, 9, 3), np.uint8)
    batch = {"image_id": ["g", "b"], "image": [good, bad], "tokens": [tokens, tokens], "prompt": ["p", "p"],
             "error_type": ["", ""], "error_message": ["", ""], "stage": ["", ""]}
    out = stage(batch)
    assert out["sr_image"][0].shape == (32, 32, 3) and not out["error_type"][0]
    assert out["error_type"][1] == "RuntimeError" and out["stage"][1] == "sr" and "out of memory" in out["error_message"][1]


def test_semantic_cache_skips_the_encoder_on_reuse(tiny_cache, tmp_path):
    from actors.semantic import SemanticStage

    images = [np.random.default_rng(k).integers(0, 256, (12, 10, 3), dtype=np.uint8) for k in range(3)]
    batch = {"image_id": ["a", "b", "c"], "image": images}
    first = SemanticStage(get_preset("tiny"), cache_uri=str(tmp_path / "cache"))
    out1 = first(dict(batch))
    assert first._encoder is not None and len(list((tmp_path / "cache").rglob("*.npz"))) == 3
    wild_prompt = get_preset("tiny").model_copy(update={"sampler": get_preset("tiny").sampler.model_copy(
        update={"added_prompt": "other words", "guidance_scale": 2.0})})
    second = SemanticStage(wild_prompt, cache_uri=str(tmp_path / "cache"))
    out2 = second(dict(batch))
    assert second._encoder is None, "every image hit the cache: SAM2 never loaded"
    for a, b in zip(out1["tokens"], out2["tokens"]):
        np.testing.assert_array_equal(a, b)
    assert out2["prompt"][0].endswith("other words") and out1["prompt"][0] != out2["prompt"][0]
    # another semantic model never reads these entries
    other = SemanticStage(get_preset("tiny").model_copy(update={"dtype": "bf16"}), cache_uri=str(tmp_path / "cache"))
    assert other.semantic_key() != first.semantic_key()


def test_sr_stage_refuses_outputs_over_the_pixel_limit(tiny_cache):
    stage = SRStage(get_preset("tiny"), max_output_pixels=40 * 40)
    tokens = np.zeros((256, 256), np.float16)
    big = np.zeros((11, 11, 3), np.uint8)  # x4 -> 44x44 > 1600
    out = stage({"image_id": ["x"], "image": [big], "tokens": [tokens], "prompt": ["p"],
                 "error_type": [""], "error_message": [""], "stage": [""]})
    assert out["error_type"][0] == "TooLarge" and "max_output_pixels" in out["error_message"][0]


def test_an_sr_call_hands_its_outputs_on_by_pixels_not_whole_batches(tiny_cache):
    """Issue 19: an SR call returned its whole batch (8 x 256 MP outputs: 6 GB in the actor, then in one write
    task). Guarded(SRStage) now runs and yields consecutive parts of at most call_output_pixels of outputs."""
    from actors.guard import guarded

    tiny = get_preset("tiny")
    stage = guarded(SRStage, "sr")(config=tiny.model_copy(update={"sampler": tiny.sampler.model_copy(
        update={"steps": 1})}), call_output_pixels=2100)  # x4: an 8x8 input is 1,024 output pixels
    tokens = np.zeros((256, 256), np.float16)
    images = [np.random.default_rng(k).integers(0, 256, (8, 8, 3), dtype=np.uint8) for k in range(5)]
    batch = {"image_id": [f"i{k}" for k in range(5)], "image": images, "tokens": [tokens] * 5, "prompt": ["p"] * 5,
             "error_type": ["", "", "DecodeError", "", ""], "error_message": [""] * 5, "stage": ["", "", "decode", "", ""]}
    parts = list(stage(batch))
    assert [list(p["image_id"]) for p in parts] == [["i0", "i1", "i2"], ["i3", "i4"]], "an error row adds no pixels"
    for part in parts:
        done = [img for img, err in zip(part["sr_image"], part["error_type"]) if not err]
        assert sum(img.shape[0] * img.shape[1] for img in done) <= 2100
    assert parts[0]["error_type"][2] == "DecodeError" and parts[1]["sr_image"][1].shape == (32, 32, 3)
    whole = list(guarded(SRStage, "sr")(config=tiny, call_output_pixels=None)(
        {k: list(v) for k, v in batch.items()}))
    assert len(whole) == 1 and len(whole[0]["image_id"]) == 5


def test_sr_stage_gives_an_image_past_its_time_budget_an_error_row(tiny_cache, monkeypatch):
    """A small file can ask for hours of denoising (a huge output): past the budget the GPU moves on."""
    import time as clock

    stage = SRStage(get_preset("tiny"), time_budget_s=0.05)
    tokens = np.zeros((256, 256), np.float16)
    real_denoise = stage.upscaler.denoise

    def slow_denoise(requests, check=None):
        if any(r.image.shape == (12, 12, 3) for r in requests):
            clock.sleep(0.1)  # the slow image: its steps start after the deadline
        return real_denoise(requests, check=check)

    monkeypatch.setattr(stage.upscaler, "denoise", slow_denoise)
    small, slow = np.zeros((8, 8, 3), np.uint8), np.zeros((12, 12, 3), np.uint8)
    stage.time_budget_s = 30.0  # the small image alone finishes well within any budget
    out = stage({"image_id": ["a"], "image": [small], "tokens": [tokens], "prompt": ["p"],
                 "error_type": [""], "error_message": [""], "stage": [""]})
    assert out["error_type"] == [""]
    stage.time_budget_s = 0.05
    out = stage({"image_id": ["b"], "image": [slow], "tokens": [tokens], "prompt": ["p"],
                 "error_type": [""], "error_message": [""], "stage": [""]})
    assert out["error_type"] == ["TimeBudgetExceeded"] and "time_budget_s=0.05" in out["error_message"][0]


def test_read_stage_never_fetches_past_the_byte_limit(tmp_path):
    from cluster.storage import read_bytes

    (tmp_path / "big.png").write_bytes(b"x" * 1000)
    (tmp_path / "ok.png").write_bytes(b"y" * 100)
    out = ReadStage(max_bytes=500)({"image_id": ["a", "b"], "src_uri": [f"file://{tmp_path}/big.png",
                                                                       f"file://{tmp_path}/ok.png"]})
    assert out["error_type"] == ["TooLarge", ""] and "max_input_bytes=500" in out["error_message"][0]
    assert out["src_bytes"].tolist() == [0, 100]
    assert read_bytes(f"{tmp_path}/ok.png", max_bytes=100) == b"y" * 100, "exactly the limit is fine"


def test_semantic_stage_prompt_sources(tiny_cache):
    from actors.semantic import SemanticStage

    tiny = get_preset("tiny")
    images = [np.random.default_rng(k).integers(0, 256, (30, 20, 3), dtype=np.uint8) for k in range(2)]
    batch = {"image_id": ["a", "b"], "image": images}
    tagged = SemanticStage(tiny)(dict(batch))
    assert all(p == f"{t}, ," + tiny.sampler.added_prompt for p, t in zip(tagged["prompt"], tagged["tags"]))
    fixed = tiny.model_copy(update={"sampler": tiny.sampler.model_copy(
        update={"prompt_source": "fixed", "fixed_tags": "cat, sofa", "user_prompt": "a photo", "added_prompt_first": True})})
    out = SemanticStage(fixed)(dict(batch))
    assert out["prompt"] == [tiny.sampler.added_prompt + ", cat, sofa, a photo,"] * 2 and out["tags"] == ["cat, sofa"] * 2


def test_tagger_source_without_ram_weights_is_a_clear_error(tiny_model):
    from srmodel.stages import load_tagger

    cfg = get_preset("tiny", tiny_model.model_copy(update={"ram": None}))
    with pytest.raises(ValueError, match="prompt_source=fixed"):
        load_tagger(cfg)


def test_semantic_stage_isolates_an_image_the_tagger_fails_on(tiny_cache):
    from actors.semantic import SemanticStage

    stage = SemanticStage(get_preset("tiny"))
    real = stage.tagger

    def tagger(images):
        if any(im.shape == (9, 9, 3) for im in images):
            raise RuntimeError("tagger broke")
        return real(images)

    stage.tagger = tagger
    good = np.zeros((12, 10, 3), np.uint8)
    bad = np.zeros((9, 9, 3), np.uint8)
    out = stage({"image_id": ["g", "b"], "image": [good, bad]})
    assert not out["error_type"][0] and out["prompt"][0]
    assert out["error_type"][1] == "RuntimeError" and out["stage"][1] == "semantic" and out["prompt"][1] == ""


def test_a_read_task_hands_rows_on_by_decoded_pixels_not_whole_batches(tmp_path):
    """Issue 19: a read task held its whole batch decoded (32 x 64 MP would be ~6 GB). It now fetches and
    decodes fetch_threads rows at a time and yields once the decoded pixels reach read_batch_pixels."""
    from actors.io import read_decode
    from tests.support.inputs import rng_image

    sizes = [(40, 40), (8, 8), (40, 40), (8, 8), (40, 40), (8, 8), (40, 40), (8, 8)]
    for k, (w, h) in enumerate(sizes):
        rng_image(w, h, k).save(tmp_path / f"{k}.png")
    batch = {"image_id": np.array([str(k) for k in range(8)]),
             "src_uri": np.array([f"file://{tmp_path}/{k}.png" for k in range(8)])}
    group = {"scale": 4, "process_size": 512, "multiple": 8}
    whole = list(read_decode(dict(batch), {}, max_pixels=10**6, fetch_threads=2, group=group))
    assert len(whole) == 1 and len(whole[0]["image_id"]) == 8, "no budget: the batch as one output"
    parts = list(read_decode(dict(batch), {}, max_pixels=10**6, fetch_threads=2, group=group,
                             max_batch_pixels=3000))
    assert [len(p["image_id"]) for p in parts] == [4, 4], "2 rows (1,664 px) at a time, yielded past 3,000 px"
    assert sorted(i for p in parts for i in p["image_id"]) == [str(k) for k in range(8)]
    assert all(not e for p in parts for e in p["error_type"])
    from actors.decode import sort_by_working_size

    for p in parts:  # each output sorted by working size within itself: sorting again changes nothing
        again = sort_by_working_size(dict(p), **group)
        assert list(again["image_id"]) == list(p["image_id"])
