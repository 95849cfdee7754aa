"""What a new user meets: fast help, plain flags, errors in the CLI's words, examples, exit codes, progress."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from tests.support.inputs import rng_image
from pipelines.cli import app

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "diffusers", "transformers", "pyarrow", "sam2", "pipelines.upscale.run", "pipelines.build_trainset")


def command_names() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="ugcsr")


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def test_help_and_argument_errors_import_no_heavy_library():
    """--help (top level and every registered command) and a usage error load neither torch nor Ray."""
    code = (
        "import sys\nfrom typer.testing import CliRunner\nimport typer.main\nfrom pipelines.cli import app\n"
        "r = CliRunner()\nnames = sorted(typer.main.get_command(app).commands)\n"
        "codes = [r.invoke(app, ['--help']).exit_code] + [r.invoke(app, [n, '--help']).exit_code for n in names]\n"
        "codes += [r.invoke(app, [n, '--no-such-option']).exit_code for n in names]\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m in {HEAVY!r})\n"
        "print(names, codes, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), check=True)
    names, codes, heavy = out.stdout.strip().split("] ", 2)
    assert "upscale" in names and "build-trainset" in names
    assert codes.strip("[") == ", ".join(["0"] * (len(command_names()) + 1) + ["2"] * len(command_names()))
    assert heavy == "[]", heavy


def test_flags_usage_and_version():
    for name in command_names():
        text = invoke(name, "--help").output
        assert "<bool>" not in text and "{" not in text.split("\n\n")[0], text
        assert f"Usage: ugcsr {name} [OPTIONS] SRC DST" in text or "SRC" not in text
    text = invoke("upscale", "--help").output
    assert "--relist / --no-relist" in text and "\n  --dry-run " in text and "--fail-on-error" in text
    assert "Exit codes" in text
    from importlib.metadata import version

    out = invoke("--version")
    assert out.exit_code == 0 and out.output.strip() == f"ugcsr {version('ugcsr')}"


def test_choices_match_the_library():
    from typing import get_args

    from pipelines.cli import upscale
    from srmodel.config import DTYPES
    from srmodel.degrade import PRESETS as DEGRADE_PRESETS
    from srmodel.presets import PRESET_NAMES

    assert set(get_args(upscale.PRESETS)) == set(PRESET_NAMES)
    assert set(get_args(upscale.DTYPES)) == set(DTYPES)
    from pipelines.cli import build_trainset

    assert set(get_args(build_trainset.PRESETS)) == set(DEGRADE_PRESETS)
    assert {p.scale for p in DEGRADE_PRESETS.values()} == {4}  # --crop's help: "the LR crop is crop / 4"


def test_errors_name_the_option_the_value_and_what_is_allowed(tmp_path):
    out = invoke("upscale", ROOT / "samples", tmp_path / "o", "--scale", "0")
    assert out.exit_code == 2 and "--scale: Input should be greater than or equal to 1; given: 0" in out.output
    out = invoke("upscale", ROOT / "samples", tmp_path / "o", "--format", "gif")
    assert out.exit_code == 2 and "'--format'" in out.output and "'gif'" in out.output and "'png'" in out.output
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: {sampler: {upscale: 0}}\nformat: gif\nresource: {}\n")
    out = invoke("upscale", ROOT / "samples", tmp_path / "o", "--config", cfg)
    assert out.exit_code == 2, out.output
    assert f"model.sampler.upscale (in --config {cfg}): Input should be greater than or equal to 1; given: 0" in out.output
    assert "format (in --config" in out.output and "'png', 'webp' or 'jpeg'; given: 'gif'" in out.output
    assert "resource (in --config" in out.output and "unknown setting" in out.output
    assert "errors.pydantic.dev" not in out.output
    # given on the command line, the same field is reported under the option's name
    out = invoke("upscale", ROOT / "samples", tmp_path / "o", "--prompt-source", "fixed", "--scale", "17")
    assert out.exit_code == 2 and "--scale: Input should be less than or equal to 16; given: 17" in out.output
    out = invoke("build-trainset", ROOT / "samples", tmp_path / "t", "--preset", "nope")
    assert out.exit_code == 2 and "'--preset'" in out.output and "'paper'" in out.output


def test_weights_need_an_explicit_real_preset(tmp_path):
    out = invoke("upscale", ROOT / "samples", tmp_path / "o", "--weights", tmp_path)
    assert out.exit_code == 2 and "--preset wild" in out.output and "--preset synthetic" in out.output


def test_dst_that_is_a_file_is_named(tmp_path):
    dst = tmp_path / "out.png"
    dst.write_bytes(b"x")
    for name in ("upscale", "build-trainset"):
        out = invoke(name, ROOT / "samples", dst, "--dry-run")
        assert out.exit_code == 2 and "'DST'" in out.output and str(dst) in out.output and "is a file" in out.output
    out = invoke("upscale", ROOT / "samples", dst / "sub", "--dry-run")
    assert out.exit_code == 2 and "which is a file" in out.output


def test_empty_src_says_so_and_exits_non_zero(tmp_path, tiny_cache):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    out = invoke("upscale", tmp_path / "empty", tmp_path / "o")
    assert out.exit_code == 3 and "holds no images" in out.output and "nothing to do" in out.output
    out = invoke("upscale", tmp_path / "empty", tmp_path / "o", "--dry-run")
    assert out.exit_code == 3 and "holds no images" in out.output
    for extra in ([], ["--dry-run"]):
        out = invoke("build-trainset", tmp_path / "empty", tmp_path / "t", *extra)
        assert out.exit_code == 3 and "hold no images" in " ".join(out.output.split()), out.output


def leaves(d: dict, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict) and k != "mix":
            yield from leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def dig(d: dict, path: tuple):
    for k in path:
        d = d[k]
    return d


@pytest.mark.parametrize("name", ["upscale", "build-trainset", "train"])
def test_example_job_files_load_and_apply(name, tmp_path):
    """Every shipped example is valid and every value in it reaches the effective job (--print-config)."""
    path = ROOT / "examples" / f"{name}.yaml"
    example = yaml.safe_load(path.read_text())
    out = invoke(name, ROOT / "samples", tmp_path / "o", "--config", path, "--print-config")
    assert out.exit_code == 0, out.output
    effective = yaml.safe_load(out.stdout)
    for key, value in leaves(example):
        assert dig(effective, key) == value, key
    # Commented-out lines name real settings too: uncommented, the file still validates.
    uncommented = "\n".join(line.replace("# ", "", 1) if line.lstrip().startswith("# ") and ":" in line
                            and not line.startswith("#") else line for line in path.read_text().splitlines())
    full = tmp_path / "full.yaml"
    full.write_text(uncommented)
    out = invoke(name, ROOT / "samples", tmp_path / "o", "--config", full, "--print-config")
    assert out.exit_code == 0, out.output


def test_config_values_apply_unless_the_option_is_given(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("preset: realesrgan\nseed: 5\ncrop: 64\n")
    out = invoke("build-trainset", ROOT / "samples", tmp_path / "o", "--config", cfg, "--seed", "9", "--print-config")
    job = yaml.safe_load(out.stdout)
    assert (job["preset"], job["seed"], job["crop"]) == ("realesrgan", 9, 64)
    cfg.write_text("format: webp\nmodel: {sampler: {steps: 7}}\n")
    out = invoke("upscale", ROOT / "samples", tmp_path / "o", "--config", cfg, "--format", "jpeg", "--print-config")
    job = yaml.safe_load(out.stdout)
    assert (job["format"], job["model"]["sampler"]["steps"], job["model"]["name"]) == ("jpeg", 7, "tiny")
    out = invoke("upscale", ROOT / "samples", tmp_path / "o", "--config", cfg, "--print-config")
    assert yaml.safe_load(out.stdout)["format"] == "webp"


def test_local_folders_relist_by_default_and_a_reused_listing_is_announced(ray_local, tmp_path, tiny_cache):
    src = tmp_path / "src"
    src.mkdir()
    rng_image(16, 16, 0).save(src / "a.png")
    from pipelines.cli.upscale import listing_note
    from pipelines.upscale.job import UpscaleJob
    from pipelines.upscale.run import make_plan
    from srmodel.presets import get_preset

    job = UpscaleJob(src=str(src), dst=str(tmp_path / "o"), model=get_preset("tiny"))
    make_plan(job)  # a first run's listing
    rng_image(16, 16, 1).save(src / "b.png")
    plan = make_plan(job)
    assert plan.to_process == 2 and not plan.listing_cached and listing_note(job, plan) == "SRC listed: 2 image(s)"
    rng_image(16, 16, 2).save(src / "c.png")
    plan = make_plan(job.model_copy(update={"relist": False}))
    note = listing_note(job, plan)
    assert plan.listing_cached and plan.to_process == 2
    assert note.startswith("reusing the listing of SRC made 20") and "(2 image(s))" in note and "--relist" in note
    out = invoke("upscale", src, tmp_path / "o", "--dry-run")
    assert json.loads(out.stdout)["to_process"] == 3


RAYLET_WARNING = ("WARNING: 8 PYTHON worker processes have been started on node: 0b62 with address: 127.0.0.1. "
                  "This could be a result of using a large number of actors")


def test_ray_cluster_warnings_never_reach_the_json_on_stdout(tmp_path, monkeypatch):
    """CI saw `(raylet) WARNING: 8 PYTHON worker processes ...` before the summary on stdout (`jq` broke):
    Ray's driver prints cluster errors to sys.stdout from a thread while connected. Here Ray's own
    printing function runs from a thread during the run, as its listener does."""
    import threading

    import ray._private.worker as ray_worker

    import pipelines.upscale.run as upscale_run

    def fake_run(job, on_plan, on_progress):
        def listener():  # ray._private.worker.listen_error_messages, minus the GCS subscription
            ray_worker.print_to_stdstream({"lines": [RAYLET_WARNING], "pid": "raylet", "is_err": False},
                                          ignore_prefix=False)

        t = threading.Thread(target=listener)
        t.start()
        t.join()
        return {"processed": 0, "wall_s": 0.0, "by_status": {}, "manifest": f"{job.dst}/_manifest"}

    monkeypatch.setattr(upscale_run, "run_upscale", fake_run)
    src = tmp_path / "src"
    src.mkdir()
    rng_image(16, 16, 3).save(src / "a.png")
    out = invoke("upscale", src, tmp_path / "out")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["by_status"] == {}, out.stdout
    assert RAYLET_WARNING in out.stderr
    assert sys.stdout is not sys.stderr  # the command gave stdout back


def test_decode_error_keeps_the_source_size_and_timings_are_per_image():
    from actors.decode import DecodeStage

    buf = io.BytesIO()
    rng_image(128, 96, 3).save(buf, "JPEG", quality=90)
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    good = io.BytesIO()
    rng_image(40, 30, 4).save(good, "PNG")
    batch = {"image_id": ["t", "g", "e", "r"], "src_uri": ["t.jpg", "g.png", "e.png", "r.png"],
             "bytes": [truncated, good.getvalue(), b"", b""], "error_type": ["", "", "", "OSError"]}
    out = DecodeStage()(batch)
    assert out["error_type"] == ["DecodeError", "", "DecodeError", "OSError"]
    assert list(out["src_width"]) == [128, 40, 0, 0] and list(out["src_height"]) == [96, 30, 0, 0]
    ms = out["t_decode_ms"]
    assert ms[0] > 0 and ms[1] > 0 and ms[2] > 0 and ms[3] != ms[3]  # row 3 failed at read: no decode time (NaN)


@pytest.mark.slow
def test_upscale_run_as_a_new_user_sees_it(tmp_path, tiny_cache):
    """No terminal: start-up phases, then progress lines; no Ray chatter; --fail-on-error exits 1; manifest facts."""
    src = tmp_path / "photos"
    src.mkdir()
    for p in (ROOT / "samples").glob("*.*g"):
        (src / p.name).write_bytes(p.read_bytes())
    buf = io.BytesIO()
    rng_image(128, 96, 3).save(buf, "JPEG", quality=90)
    (src / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    dst = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "upscale", str(src), str(dst), "--fail-on-error",
                           "--log-interval", "2"], capture_output=True, text=True, env=env(UGCSR_CACHE=tiny_cache),
                          timeout=900)
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert "SRC listed: 4 image(s); 4 to process, 0 already done" in err
    assert "starting 1 SR actor(s) (SAM2 and the tagger inside), loading models" in err
    assert "4/4 images" in err and "1 failed" in err and "1 image(s) failed" in err
    for chatter in ("Token authentication", "Execution plan", "Progress bars disabled", "concurrent tasks",
                    "streaming_executor", "UserWarning"):
        assert chatter not in err, chatter
    summary = json.loads(proc.stdout)
    assert summary["by_status"] == {"ok": 3, "error": 1} and os.path.isdir(summary["ray_logs"])
    rows = {Path(r["src_uri"]).name: r for f in (dst / "_manifest").rglob("*.parquet") for r in pq.read_table(f).to_pylist()}
    bad = rows["truncated.jpg"]
    assert (bad["status"], bad["src_width"], bad["src_height"]) == ("error", 128, 96)
    assert bad["timings_ms"]["decode"] > 0 and bad["timings_ms"]["sr"] is None
    ok = [r for r in rows.values() if r["status"] == "ok"]
    # one SR forward shared by output pixels: images of different sizes get different times
    assert len({r["timings_ms"]["sr"] for r in ok}) == 3 and all(r["timings_ms"]["sr"] > 0 for r in ok)
    w = {Path(r["src_uri"]).name: r["timings_ms"]["sr"] / (r["dst_width"] * r["dst_height"]) for r in ok}
    assert max(w.values()) == pytest.approx(min(w.values()), rel=1e-6)


def test_execution_images_below_one_is_a_settings_error_naming_the_file(tmp_path):
    (tmp_path / "src").mkdir()
    config = tmp_path / "job.yaml"
    config.write_text("execution_images: 0\n")
    out = invoke("upscale", tmp_path / "src", tmp_path / "out", "--config", config, "--dry-run")
    assert out.exit_code == 2, out.output
    assert f"execution_images (in --config {config})" in out.stderr and "greater than or equal to 1" in out.stderr


def test_the_new_scale_settings_answer_bad_values_clearly(tmp_path):
    """Issue 19's settings (manifest age, read pixel budget and memory, start timeout) through --config."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("manifest_max_age_s: 0\nactor_start_timeout_s: -5\nretries: {max_device_faults: 0}\n"
                   "resources: {read_batch_pixels: 0, read_memory_gb: -1, sr_call_pixels: 0, write_memory_gb: -1}\n")
    out = invoke("upscale", ROOT / "samples", tmp_path / "o", "--config", cfg)
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    for field in ("manifest_max_age_s", "actor_start_timeout_s", "resources.read_batch_pixels",
                  "resources.read_memory_gb", "retries.max_device_faults", "resources.sr_call_pixels",
                  "resources.write_memory_gb"):
        assert f"{field} (in --config" in text, (field, text)
    good = tmp_path / "good.yaml"
    good.write_text("manifest_max_age_s: 30\nactor_start_timeout_s: null\nresources: {read_batch_pixels: 64000000}\n")
    out = invoke("upscale", ROOT / "samples", tmp_path / "o", "--config", good, "--print-config")
    assert out.exit_code == 0 and "manifest_max_age_s: 30" in out.output and "read_batch_pixels: 64000000" in out.output
