"""Adam's step counters after a universal resume, as `--resume universal` loads them, on CPU.

Usage: ds_universal_step.py OUT.json WORK_DIR ZERO_JSON. Trains 3 steps, saves, converts the checkpoint to
DeepSpeed's universal format, builds a fresh engine that loads it, takes one more step and writes, per
optimizer state, its step after the load and after that update, and whether states share a step tensor.
"""
import json
import sys
from pathlib import Path

from ds_engine_ops import tiny_batch, tiny_engine

from medsapiens.distributed import init_distributed, shutdown
from medsapiens.model.loss import LandmarkObjective
from medsapiens.training import checkpoints


def main(out: str, work: str, zero_json: str) -> None:
    init_distributed(120)
    ckpt = Path(work) / "checkpoints"
    first = tiny_engine(zero_json)
    for _ in range(3):
        first.train_step([tiny_batch()], LandmarkObjective())
    first.save(ckpt, 3, {"step": 3})
    first.close()
    checkpoints.make_universal(ckpt)
    resumed = tiny_engine(zero_json, universal=True)
    resumed.load(ckpt, checkpoints.resume_tag(ckpt, "universal"))
    states = resumed.ds.basic_optimizer.state
    steps = [state["step"] for state in states.values()]
    loaded = [float(step) for step in steps]
    resumed.train_step([tiny_batch()], LandmarkObjective())
    with open(out, "w") as f:
        json.dump({"states": len(steps), "step_tensors": len({id(step) for step in steps}),
                   "dtypes": sorted({str(step.dtype) for step in steps}), "loaded": loaded,
                   "after_one_update": [float(state["step"]) for state in states.values()]}, f)
    resumed.close()
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
