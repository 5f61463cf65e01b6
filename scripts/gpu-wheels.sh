#!/usr/bin/env bash
# Wheels (Python 3.12, x86-64) for the few packages the GPU machine's image lacks and the GPU checks import
# (blake3, pydantic, eth-utils and their needs; typing-extensions too: pydantic needs a newer one than the image may hold);
# into .whl/ (git-ignored), which scripts/gpu-checks.sh installs there.
set -euo pipefail
cd "$(dirname "$0")/.."
plat=()
for p in manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
  annotated-types==0.8.0 blake3==1.0.11 cytoolz==1.2.0 eth-hash==0.8.0 eth-typing==6.0.0 eth-utils==6.0.0 pydantic==2.14.4 \
  pydantic_core==2.50.5 safe-pysha3==1.0.7 toolz==1.2.0 typing-inspection==0.4.5 typing-extensions==4.16.0
ls .whl
