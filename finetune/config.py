"""The fine-tuning config: where the model starts, what trains, on which (few) images."""
from __future__ import annotations

from dataclasses import dataclass, field

from medsapiens.data.pipeline import DataConfig
from medsapiens.engine import OptimConfig, TrainConfig
from medsapiens.model import ModelConfig

INIT_SOURCES = ("bundle", "sapiens", "scratch")


@dataclass
class LoraConfig:
    enabled: bool = False
    qkv_rank: int = 4
    qkv_alpha: float = 4.0
    proj_rank: int = 8
    proj_alpha: float = 8.0
    dropout: float = 0.1


@dataclass
class FinetuneConfig:
    """init: `bundle` (a pretrained bundle; its architecture wins over `model`), `sapiens` (a raw
    Sapiens checkpoint in model.checkpoint: the paper's "Sapiens + LoRA" baseline) or `scratch`.
    shots: 0 trains on the whole train split, K > 0 on K images drawn by `shot_seed`; `seeds`
    lists several shot seeds to run one after another (their mean and std are reported).
    eval_split: the split evaluated at the end; `auto` takes `test`, else every `test*` split
    (ISBI 2015's test1 and test2), each reported; the first one is the run's headline."""

    run_dir: str = "runs/finetune"
    dataset: str = ""
    init: str = "bundle"
    bundle: str = ""
    shots: int = 0
    shot_seed: int = 0
    seeds: list[int] = field(default_factory=list)
    eval_split: str = "auto"
    flip_test: bool = False
    eval_overlays: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=50, schedule="cosine"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=500, val_every=100, checkpoint_every=100,
                                                                   keep_last=1))
