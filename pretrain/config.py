"""The pretraining experiment config: one typed section per component."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from medsapiens.data.pipeline import DataConfig
from medsapiens.model import LAYER_DECAY_APPLIES_WHEN, LoraConfig, ModelConfig
from medsapiens.training.engine import OptimConfig, TrainConfig


@dataclass
class PretrainConfig:
    """lora.enabled trains LoRA adapters and the decoder on a frozen backbone (MedSapiens'
    multi-dataset stage); the exported bundle holds the merged weights."""

    APPLIES_WHEN: ClassVar = LAYER_DECAY_APPLIES_WHEN

    run_dir: str = "runs/pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
