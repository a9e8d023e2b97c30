#!/usr/bin/env bash
# Wheels that bench/train_step.py needs beyond a CUDA machine's usual PyTorch stack (torch, timm,
# numpy, safetensors, pyyaml, tqdm, ...), for a GPU machine without package access: run here,
# copy .whl/ there with the checkout, then run bench/gpu_train_step.sh there.
#     bash bench/gpu_wheels.sh [PYTHON_VERSION]      # the GPU machine's Python, default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
mkdir -p .whl
python3 -m pip wheel -q --no-deps -w .whl "deepspeed==$(python3 -c 'from importlib.metadata import version; print(version("deepspeed"))')"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    hjson isal pydantic pydantic-core annotated-types typing-inspection
ls -1 .whl
