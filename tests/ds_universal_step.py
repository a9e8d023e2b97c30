"""Adam's step counters after a universal resume, as `--resume universal` loads them, on CPU.

Usage: ds_universal_step.py OUT.json WORK_DIR ZERO_JSON. Trains 3 steps, saves, converts the checkpoint to
DeepSpeed's universal format, builds a fresh engine that loads it, takes one more step and writes, per
optimizer state, its step after the load and after that update, and whether states share a step tensor.
"""
import json
import sys
from pathlib import Path

import torch

from medsapiens.distributed import init_distributed, shutdown
from medsapiens.model import ModelConfig, param_groups
from medsapiens.model.loss import LandmarkObjective
from medsapiens.training import checkpoints
from medsapiens.training.engine import Engine, OptimConfig, TrainConfig

BATCH = {"images": torch.rand(2, 1, 128, 96) * 255, "dataset_index": torch.zeros(2, dtype=torch.long),
         "target_heatmaps": torch.rand(2, 19, 32, 24), "target_weights": torch.ones(2, 19)}


def engine(zero_json: str, universal: bool) -> Engine:
    torch.manual_seed(0)
    model = ModelConfig(arch="sapiens_tiny", img_size=(128, 96), trunk_width=32).build({"head": 19})
    return Engine(model, param_groups(model, 0.05), TrainConfig(deepspeed=zero_json, precision="fp32", max_steps=100),
                  OptimConfig(warmup_steps=1), micro_batch=2, universal=universal)


def main(out: str, work: str, zero_json: str) -> None:
    init_distributed(120)
    ckpt = Path(work) / "checkpoints"
    first = engine(zero_json, universal=False)
    for _ in range(3):
        first.train_step([BATCH], LandmarkObjective())
    first.save(ckpt, 3, {"step": 3})
    first.close()
    checkpoints.make_universal(ckpt)
    resumed = engine(zero_json, universal=True)
    resumed.load(ckpt)
    states = resumed.ds.basic_optimizer.state
    steps = [state["step"] for state in states.values()]
    loaded = [float(step) for step in steps]
    resumed.train_step([BATCH], LandmarkObjective())
    with open(out, "w") as f:
        json.dump({"states": len(steps), "step_tensors": len({id(step) for step in steps}),
                   "dtypes": sorted({str(step.dtype) for step in steps}), "loaded": loaded,
                   "after_one_update": [float(state["step"]) for state in states.values()]}, f)
    resumed.close()
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
