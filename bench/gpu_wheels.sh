#!/usr/bin/env bash
# Wheels for a GPU machine whose image has torch but not Ray, diffusers, sam2 and their needs
# (docs/performance.md). Run here, in the repository root, where pip reaches PyPI:
#
#   bash bench/gpu_wheels.sh            # -> .whl/ (every wheel) and .carry1/ ... .carryN/
#
# One device call carries at most 64 MiB, the working tree included, so the wheels are cut into
# .carryK/ folders that each fit beside the tree; the Ray wheel (~79 MB) is split into pieces
# (ray.part-aa, -ab, ...) that the last call `cat`s back together. All are ignored by git.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

# Not in the GPU image (see .library/device/KINDS.md's package list); the versions this repo is tested with.
BINARY="ray==2.60.0 diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 pydantic==2.13.4 pydantic-core==2.46.4
        annotated-types==0.7.0 typing-inspection==0.4.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
        referencing==0.37.0 rpds-py==0.30.0 importlib-metadata==10.2.0"
SDIST="sam2==1.1.0 antlr4-python3-runtime==4.9.3 iopath==0.1.10"  # no wheels on PyPI: built here, pure Python

exclude="$(git rev-parse --git-common-dir)/info/exclude"
for pattern in /.whl/ '/.carry*/'; do grep -qxF "$pattern" "$exclude" || echo "$pattern" >> "$exclude"; done
rm -rf .whl .carry*
mkdir -p .whl
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl $BINARY
# sam2 without its CUDA extension (the model code needs none): a py3-none-any wheel.
# shellcheck disable=SC2086
SAM2_BUILD_CUDA=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl $SDIST

# Room per call: 64 MiB less what travels anyway (tracked and untracked-not-ignored files, shared/), 2 MiB spare.
tree=$( (git ls-files -z -co --exclude-standard; [ -d shared ] && find shared -type f -print0) |
        xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
room=$(( 64 * 1048576 - tree - 2 * 1048576 ))
[ "$room" -gt 4194304 ] || { echo "the working tree ($((tree / 1048576)) MiB) leaves no room for wheels" >&2; exit 1; }

# The Ray wheel in pieces of at most `room`; the other wheels go with the last piece if they fit, else alone.
ray=$(ls .whl/ray-*.whl)
split -b "$room" "$ray" .whl/ray.part-
pieces=(.whl/ray.part-*)
k=0
for p in "${pieces[@]}"; do k=$((k + 1)); mkdir -p ".carry$k"; mv "$p" ".carry$k/"; done
rest=$(ls .whl/*.whl | grep -v '/ray-' | xargs stat -c %s | awk '{s += $1} END {print s + 0}')
last=$(stat -c %s ".carry$k"/ray.part-*)
[ $((last + rest)) -le "$room" ] || { k=$((k + 1)); mkdir -p ".carry$k"; }
ls .whl/*.whl | grep -v '/ray-' | xargs -I{} cp {} ".carry$k/"
echo "$(basename "$ray")" > ".carry$k/RAY_WHEEL"
echo "tree $((tree / 1048576)) MiB, room $((room / 1048576)) MiB per call; carries:"
du -sh .carry*
