#!/usr/bin/env bash
# Installs ugcsr and everything it needs into the current Python environment.
# Order matters: torch first (a plain range would pull multi-GB CUDA builds),
# then sam2 (an sdist that compiles against the installed torch; no CUDA
# extension needed: it only speeds up mask post-processing we never run),
# then the package itself with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
SAM2_BUILD_CUDA=0 "$PY" -m pip install --quiet --no-build-isolation "sam2==1.1.0"
"$PY" -m pip install --quiet -e ".[test]"
