"""The README's main command on the bundled samples, and import hygiene."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_srmodel_does_not_import_ray():
    code = "import sys, srmodel; bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow  # the README's command: local Ray, a tiny model
def test_readme_main_command_on_samples(tmp_path, tiny_model, monkeypatch):
    env = {"UGCSR_CACHE": str(Path(tiny_model.sd_base).parents[1])}
    dst = tmp_path / "out"
    proc = subprocess.run(
        ["ugcsr", "upscale", str(ROOT / "samples"), str(dst), "--preset", "tiny"],
        capture_output=True, text=True, env={**__import__("os").environ, **env}, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("sunset", "shapes", "small_rgba"):
        src = next((ROOT / "samples").glob(f"{name}.*"))
        w, h = Image.open(src).size
        assert Image.open(dst / f"{name}.png").size == (4 * w, 4 * h)
    rows = [r for f in (dst / "_manifest").rglob("*.parquet") for r in pq.read_table(f).to_pylist()]
    assert sorted(r["status"] for r in rows) == ["ok"] * 3
    assert all(r["params_hash"] and r["seed"] is not None and r["dst_uri"].startswith("file://") for r in rows)
    summary = json.loads((dst / "_runs" / "latest" / "summary.json").read_text())
    assert summary["by_status"] == {"ok": 3}


@pytest.mark.slow  # three `ugcsr` processes, one builds the tiny model
def test_cli_rejects_bad_options(tmp_path):
    proc = subprocess.run(["ugcsr", "upscale", str(ROOT / "samples"), str(tmp_path), "--preset", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "'--preset'" in proc.stderr and "'nope' is not one of" in proc.stderr
    proc = subprocess.run(["ugcsr", "upscale", str(ROOT / "samples"), str(tmp_path), "--preset", "wild",
                           "--weights", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode != 0 and "missing" in proc.stderr
    proc = subprocess.run(["ugcsr", "upscale", str(tmp_path / "nodir"), str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode != 0 and "nodir" in proc.stderr
