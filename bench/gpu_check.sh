#!/usr/bin/env bash
# The GPU acceptance run: one command on an offline CUDA machine, at most ~9 minutes on one GPU.
#   1. the pipeline end to end through the real launcher, on phantoms at 1024x768 with sapiens_0.3b:
#      pretrain (validation, a checkpoint), export, fine-tune, evaluate, predict, ONNX export; the
#      perf/* and val/* tags read back from TensorBoard; the DeepSpeed ops the run built listed
#      (there should be none);
#   2. bench/train_step.py's settings, each in its own process (no memory left over from the one
#      before), each row printed and kept as soon as it is measured, so a timeout loses only the
#      row in progress; the summary table last.
#
#     bash bench/gpu_wheels.sh 3.12        # here, once: .whl/ with what the GPU machine lacks
#     bash bench/gpu_check.sh OUT_DIR      # there, with .whl/ beside the checkout
#
# PART=e2e or PART=rows runs one part alone (each fits one device command of under 10 minutes; the
# first run on an H200 took about 4 and 7); the default runs both.
# OUT_DIR gets gpu.txt (machine, versions), e2e.log and e2e.json (each step's status and seconds,
# the TensorBoard tags, the ops built), train_step.log (rows, profiles), train_step.jsonl (one row
# a line) and summary.txt (the table, then the pipeline's img/s against the bench's bf16 row at the
# pipeline's micro-batch, measured too when the card fitted another: run both parts into one OUT_DIR).
# Exit status: 0 when every step and row ran, 1 otherwise.
# SETTINGS overrides the rows, NAME or NAME:MICRO_BATCH each (names from bench/train_step.py). Without a
# micro-batch a row starts at the largest power of two that the memory estimate of `model info` fits on
# this GPU, and halves until a step runs: on one H200 the estimate starts at the first run's
# micro-batches but 1b's (64, where 32 fitted), on an 80 GB H100 at about half of them.
# PROFILE names the rows followed by torch.profiler's top operators and the
# time by kind of work (default bf16+compile, the setting the MFU target is about; "all" or "" for
# every row or none). For a smoke run of the script itself on a CPU: DEVICE=cpu and OVERRIDES with a
# tiny model in bf16, as a GPU trains (e.g. "model.arch=sapiens_tiny model.img_size=[128,96]
# model.trunk_width=32 train.precision=bf16"), added to the pretraining and fine-tuning settings; to
# see what the GPU machine sees, with no medsapiens installed, put a sitecustomize.py on PYTHONPATH
# that drops the editable install's import hook from sys.meta_path.
# On the device tool: carry .whl (git ignores it); the H200 kind gives rows comparable with the first run's
# table (bench/RESULTS.md), an H100 runs the same script at the micro-batches its memory fits.
set -uo pipefail
cd "$(dirname "$0")/.."
out="$(mkdir -p "${1:?give an output folder}" && cd "$1" && pwd)"
settings="${SETTINGS:-recipe bf16 bf16+compile bf16+ckpt 1b-zero3+ckpt 2b-zero3+ckpt s2-0.4b-bf16}"
part="${PART:-all}"
pipeline_batch=16  # the pipeline part's micro-batch, and the bench row it is compared with
case "$part" in all | e2e | rows) ;; *) echo "PART must be all, e2e or rows, got '$part'" >&2; exit 2 ;; esac
work="$(mktemp -d)"
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}" PATH="/tmp/site/bin:$PATH"
fi
if compgen -G ".whl/onnx/*.whl" >/dev/null; then  # onnx's protobuf, for the ONNX step alone
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-onnx .whl/onnx/*.whl
fi
# The package as it installs (the stage folders inside medsapiens/), from this checkout, with no build step.
mkdir -p "$work/src/medsapiens"
ln -s "$PWD"/medsapiens/* "$work/src/medsapiens/"
for stage in shards pretrain finetune evaluate launch; do ln -s "$PWD/$stage" "$work/src/medsapiens/$stage"; done
# PYTHONSAFEPATH: `python -m` would put the checkout first on the import path, and its medsapiens/ holds no stage
export PYTHONPATH="$work/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
if ! python3 -c 'import deepspeed, webdataset, pydantic, isal, hjson' >/dev/null 2>"$work/imports.err"; then
    echo "$(tail -1 "$work/imports.err"): run bench/gpu_wheels.sh where packages can be fetched, bring .whl/ here" >&2
    exit 2
fi
export TORCH_EXTENSIONS_DIR="$work/torch_extensions"  # empty: whatever DeepSpeed compiles shows up here
{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
    python3 -c 'import sys, torch, deepspeed, timm; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "deepspeed", deepspeed.__version__, "timm", timm.__version__)'
    echo "nvcc: $(command -v nvcc || echo none on PATH)"
    git log -1 --format="commit %h %s" 2>/dev/null || true
} | tee "$out/gpu.txt"

steps_json="$work/steps.jsonl"
step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record status and seconds
    local name="$1" limit="$2" start rc
    shift 2
    echo "== $name: $*" | tee -a "$out/e2e.log"
    start=$(date +%s)
    timeout -k 30 "$limit" "$@" >>"$out/e2e.log" 2>&1
    rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" | tee -a "$steps_json"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

e2e() {
ms="python3 -m medsapiens.launch.cli"
w="$work/e2e"
step phantoms 120 $ms shards phantoms --out "$w/raw" --n 64 --seed 0 &&
step shards 120 $ms shards build --source head="$w/raw/head" --source hand="$w/raw/hand" \
    --source chest="$w/raw/chest" --source leg="$w/raw/leg" --out "$w/shards" --max-side 1024 --workers 8 \
    --opt hand.split=seeded --no-progress &&
step pretrain 200 $ms launch pretrain --config launch/experiments/sapiens_0.3b.yaml --gpus 1 model.checkpoint=null \
    data.shards="$w/shards" "data.datasets=[head,hand,chest]" data.micro_batch=$pipeline_batch data.workers=8 train.epochs=0 \
    train.max_steps=30 optim.warmup_steps=3 train.val_every=30 train.checkpoint_every=30 train.log_every=10 train.val_limit=32 \
    run_dir="$w/pretrain" ${OVERRIDES:-} &&
step export 120 $ms pretrain export "$w/pretrain" --out "$w/bundle" &&
step finetune 200 $ms finetune --bundle "$w/bundle" --shards "$w/shards" --dataset leg --steps 20 --run-dir "$w/ft" \
    data.micro_batch=$pipeline_batch data.workers=8 train.val_every=20 train.checkpoint_every=20 ${OVERRIDES:-} &&
step evaluate 90 $ms evaluate --bundle "$w/ft/bundle" --shards "$w/shards" --split test --out "$w/eval" --device "${DEVICE:-cuda}" &&
step predict 90 $ms predict --bundle "$w/ft/bundle" --out "$w/pred" --device "${DEVICE:-cuda}" $(ls "$w"/raw/leg/pngs/*.png | head -4) &&
step onnx 180 env PYTHONPATH="/tmp/site-onnx:$PYTHONPATH" $ms export onnx "$w/ft/bundle" --out "$w/leg.onnx"
python3 - "$w" "$steps_json" "$TORCH_EXTENSIONS_DIR" >"$out/e2e.json" <<'EOF'
import json, os, sys
from pathlib import Path
work, steps, extensions = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
result = {"steps": [json.loads(line) for line in open(steps)],
          "ops_built": sorted(p.name for p in extensions.iterdir()) if extensions.is_dir() else []}
for run in ("pretrain", "ft"):
    if (work / run / "tensorboard").is_dir():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(work / run / "tensorboard")).Reload()
        result[run] = {tag: [round(e.value, 6) for e in events.Scalars(tag)][-3:]
                       for tag in events.Tags()["scalars"] if tag.split("/")[0] in ("perf", "val", "loss")}
report = work / "eval" / "report.json"
if report.is_file():
    r = json.loads(report.read_text())
    result["evaluate"] = {k: r.get(k) for k in ("dataset", "evaluated_on", "images", "mre", "unit", "flip_test")}
if (work / "leg.onnx").is_file():
    result["onnx_mb"] = round(os.path.getsize(work / "leg.onnx") / 2**20, 1)
print(json.dumps(result, indent=1))
EOF
cat "$out/e2e.json"
if [ -n "$(ls -A "$TORCH_EXTENSIONS_DIR" 2>/dev/null)" ]; then
    echo "DeepSpeed compiled ops: $(ls "$TORCH_EXTENSIONS_DIR")"
    status=1
fi
}

row() {  # row NAME [train_step.py options]: one setting in a process of its own, kept as it is measured
    timeout -k 30 240 python3 bench/train_step.py --only "$@" --steps 5 --warmup 2 --jsonl "$out/train_step.jsonl" \
        2>&1 | tee -a "$out/train_step.log" || status=1
}

rows() {
profiled="${PROFILE-bf16+compile}"
for setting in $settings; do
    name="${setting%%:*}" options=()
    [ "$name" = "$setting" ] || options+=(--micro-batch "${setting#*:}")
    case " $profiled " in *" $name "* | *" all "*) options+=(--profile) ;; esac
    row "$name" "${options[@]}"
    # where the card fitted bf16 another micro-batch, the pipeline's too, for the summary's comparison
    if [ "$name" = bf16 ] && ! grep -q "\"name\": \"bf16\",.*\"micro_batch\": $pipeline_batch," "$out/train_step.jsonl" 2>/dev/null; then
        row bf16 --micro-batch "$pipeline_batch"
    fi
done
python3 bench/train_step.py --summary "$out/train_step.jsonl" | tee "$out/summary.txt"
python3 - "$out" "$pipeline_batch" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
from pathlib import Path
out, batch = Path(sys.argv[1]), int(sys.argv[2])
kept = out / "train_step.jsonl"
rows = [json.loads(line) for line in kept.read_text().splitlines() if line.strip()] if kept.is_file() else []
bench = next((r["images_per_s"] for r in rows if r["name"] == "bf16" and r["micro_batch"] == batch), None)
e2e = json.loads((out / "e2e.json").read_text()) if (out / "e2e.json").is_file() else {}
pipeline = e2e.get("pretrain", {}).get("perf/samples_per_s_all_ranks", [None])[-1]
if bench and pipeline:
    print(f"the pipeline (launch pretrain, micro-batch {batch}, last window): {pipeline:.2f} img/s, "
          f"{pipeline / bench:.0%} of the bench's bf16 row at micro-batch {batch} ({bench:.2f} img/s)")
else:
    print(f"no pipeline comparison: it needs PART=e2e's e2e.json here and a bf16 row at micro-batch {batch}")
EOF
}

[ "$part" = rows ] || e2e
[ "$part" = e2e ] || rows
rm -rf "$work"
exit "$status"
