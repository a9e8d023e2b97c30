"""One training step on a fixed global batch, run by tests with and without the DeepSpeed launcher.

Usage: ds_first_step.py SHARDS OUT GLOBAL_BATCH ZERO_JSON [compile]. Rank r takes global samples
[r*B, (r+1)*B) with B = GLOBAL_BATCH / world size; rank 0 writes the global mean loss and the full
gradients (gathered from the ZeRO partitions) to OUT.safetensors / OUT.json. `compile` sets
train.compile (torch.compile through DeepSpeed).
"""
import json
import sys

import numpy as np
import torch
from deepspeed.utils import safe_get_full_grad
from safetensors.torch import save_file

from medsapiens import distributed
from medsapiens.data.augment import AugmentConfig, normalize
from medsapiens.data.pipeline import collate, decode_sample, read_shard, training_example
from medsapiens.distributed import init_distributed, shutdown
from medsapiens.io import manifest as manifestlib
from medsapiens.model import ModelConfig, param_groups
from medsapiens.training.engine import Engine, OptimConfig, TrainConfig

DATASETS = ("head", "hand")
INPUT = (96, 128)


def fixed_examples(shards: str, count: int) -> list[dict]:
    """Global sample i: alternately head and hand, augmented with a generator seeded by i."""
    manifest = manifestlib.load(shards)
    pools = {d: [s for shard in manifest.shards_for(d, "train") for s in read_shard(manifest, shard)]
             for d in DATASETS}
    examples = []
    for i in range(count):
        index = i % len(DATASETS)
        dataset = DATASETS[index]
        image, meta = decode_sample(pools[dataset][i // len(DATASETS)])
        examples.append(training_example(image, meta, manifest.landmark_set(dataset), index, INPUT, 2.0,
                                         AugmentConfig(), np.random.default_rng(i)))
    return examples


def main(shards: str, out: str, global_batch: int, zero_json: str, compile_model: bool = False) -> None:
    rank, world = init_distributed(120)
    per_rank = global_batch // world
    examples = fixed_examples(shards, global_batch)[rank * per_rank:(rank + 1) * per_rank]
    torch.manual_seed(0)
    model = ModelConfig(arch="sapiens_tiny", img_size=(128, 96), trunk_width=32).build({"head": 19, "hand": 37})
    train = TrainConfig(deepspeed=zero_json, precision="fp32", compile=compile_model)
    engine = Engine(model, param_groups(model, 0.05), train, OptimConfig(), micro_batch=per_rank)
    batch = engine.to_device(collate(examples))
    outputs = engine.ds(normalize(batch["images"]), batch["dataset_index"])
    loss = model.loss(outputs, batch["target_heatmaps"], batch["target_weights"])
    engine.ds.backward(loss.total)
    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.ds.module.named_parameters()}
    loss_sum, _ = distributed.sum_across_ranks({"loss": (loss.total.item(), 1)}, ["loss"])["loss"]
    mean_loss = loss_sum / world
    if rank == 0:
        save_file(grads, f"{out}.safetensors")
        with open(f"{out}.json", "w") as f:
            json.dump({"loss": mean_loss, "world_size": world, "compiled": engine.compiled_regions > 0}, f)
    shutdown()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1], int(args[2]), args[3], args[4:] == ["compile"])
