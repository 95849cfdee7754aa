"""How long `ugcsr --help` and each command's --help take, beside importing the heavy libraries.

    python bench/cli_help.py [--repeat 5]

Each is a fresh Python process (what a user's shell starts); the median of
--repeat runs is printed, and the ratio to `import torch, ray.data, diffusers`
(what help cost when the CLI imported them at start).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall(args: list[str], repeat: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    sys.path.insert(0, str(ROOT))
    import typer.main

    from pipelines.cli import app

    heavy = wall(["-c", "import torch, ray.data, diffusers"], repeat)
    print(f"import torch, ray.data, diffusers: {heavy:.2f} s (median of {repeat})")
    for name in [None, *sorted(typer.main.get_command(app).commands)]:
        args = ["-m", "pipelines.cli", *([name] if name else []), "--help"]
        t = wall(args, repeat)
        print(f"ugcsr {name + ' ' if name else ''}--help: {t:.2f} s ({t / heavy:.2f} of the heavy imports)")


if __name__ == "__main__":
    main()
