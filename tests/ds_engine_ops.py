"""What a run asks DeepSpeed to build, on CPU: DeepSpeed's op builders refuse from the start, then
torch.distributed starts as a run starts it and an engine is built and takes one step for each ZeRO config given.

Usage: ds_engine_ops.py OUT.json ZERO_JSON [ZERO_JSON ...]. Writes, per config, the optimizer class
DeepSpeed made, whether it is PyTorch's fused kernel, the step's loss, what the optimizer holds per
parameter, and the ops it tried to build.
"""
import json
import sys

import torch
from deepspeed.ops.op_builder.builder import OpBuilder

from medsapiens.distributed import init_distributed, shutdown
from medsapiens.model import ModelConfig, param_groups
from medsapiens.model.loss import LandmarkObjective
from medsapiens.training.engine import Engine, OptimConfig, TrainConfig

built: list[str] = []


def refuse_to_build(builder, *args, **kwargs):
    built.append(builder.name)
    raise RuntimeError(f"the run asked DeepSpeed to build its {builder.name} op")


def tiny_engine(zero_json: str, universal: bool = False) -> Engine:
    """sapiens_tiny with one 19-landmark head under the ZeRO config, fp32, seeded."""
    torch.manual_seed(0)
    model = ModelConfig(arch="sapiens_tiny", img_size=(128, 96), trunk_width=32).build({"head": 19})
    return Engine(model, param_groups(model, 0.05), TrainConfig(deepspeed=zero_json, precision="fp32"),
                  OptimConfig(warmup_steps=1), micro_batch=2, universal=universal)


def tiny_batch() -> dict:
    """Two random images and targets for tiny_engine's head."""
    return {"images": torch.rand(2, 1, 128, 96) * 255, "dataset_index": torch.zeros(2, dtype=torch.long),
            "target_heatmaps": torch.rand(2, 19, 32, 24), "target_weights": torch.ones(2, 19)}


def one_step(zero_json: str) -> dict:
    engine = tiny_engine(zero_json)
    stats, _ = engine.train_step([tiny_batch()], LandmarkObjective())
    optimizer = engine.ds.basic_optimizer
    return {"zero": zero_json, "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
            "fused": optimizer.defaults.get("fused"), "loss": float(stats[0]["head"][0]) / 2,
            **held_by_the_optimizer(engine)}


def held_by_the_optimizer(engine) -> dict:
    """Bytes per parameter of the fp32 master weights and Adam's states after a step, and whether the
    masters are a copy of the model's weights (sharing no storage with them)."""
    zero, params = engine.ds.optimizer, list(engine.ds.module.parameters())
    masters = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat
    states = [v for state in engine.ds.basic_optimizer.state.values() for v in state.values() if v.dim() > 0]
    weights = {p.untyped_storage().data_ptr() for p in params}
    count = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    return {"master_is_a_copy": not any(m.untyped_storage().data_ptr() in weights for m in masters),
            "bytes_per_param": sum(t.numel() * t.element_size() for t in [*masters, *states]) / count}


def main(out: str, zero_jsons: list[str]) -> None:
    OpBuilder.load = refuse_to_build
    init_distributed(60)
    rows = [one_step(z) for z in zero_jsons]
    with open(out, "w") as f:
        json.dump({"rows": rows, "built": built}, f)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
