#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh needs beyond a CUDA machine's usual PyTorch stack (torch, timm, numpy,
# safetensors, pyyaml, tqdm, tensorboard, onnxruntime, ...), for a GPU machine without package access:
# run here, in the project's environment (its versions are the ones fetched, so pairs such as pydantic
# and pydantic-core match), copy .whl/ there with the checkout, then run bench/gpu_check.sh there.
#     .venv/bin/pip install -e '.[onnx]' && PATH=.venv/bin:$PATH bash bench/gpu_wheels.sh [PYTHON_VERSION]
# PYTHON_VERSION is the GPU machine's Python, default 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
pinned() {  # NAME==VERSION as installed here, else NAME
    for name in "$@"; do
        python3 -c "from importlib.metadata import version; print('$name==' + version('$name'))" 2>/dev/null || echo "$name"
    done
}
mkdir -p .whl
python3 -m pip wheel -q --no-deps -w .whl "$(pinned deepspeed)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    $(pinned hjson isal pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset \
      braceexpand pydicom boto3 botocore jmespath s3transfer onnx onnxscript onnx-ir ml-dtypes)
# onnx needs a newer protobuf than a GPU machine's TensorBoard may have brought: kept apart, for the ONNX step only.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/onnx \
    "$(pinned protobuf)"
ls -1 .whl .whl/onnx
