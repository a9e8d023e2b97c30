#!/usr/bin/env bash
# bench/train_step.py on a CUDA machine, as one prepared run: installs the wheels that
# bench/gpu_wheels.sh put in .whl/ (if any), then measures and writes OUT_DIR/train_step.{json,log}.
#     bash bench/gpu_train_step.sh OUT_DIR [train_step.py arguments, e.g. --only bf16 bf16+compile]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?give an output folder}"
shift
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } | tee "$out/gpu.txt"
python3 -c 'import torch, deepspeed, timm; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "timm", timm.__version__)' \
    | tee -a "$out/gpu.txt"
PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}" python3 bench/train_step.py --steps 5 --max-batch 32 \
    --json "$out/train_step.json" "$@" 2>&1 | tee "$out/train_step.log"
