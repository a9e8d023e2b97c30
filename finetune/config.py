"""The fine-tuning config: where the model starts, what trains, on which (few) images."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from medsapiens.data.pipeline import DataConfig
from medsapiens.model import LAYER_DECAY_APPLIES_WHEN, LoraConfig, ModelConfig
from medsapiens.training.engine import OptimConfig, TrainConfig

INIT_SOURCES = ("bundle", "sapiens", "scratch")
RESUME_MODES = ("auto", "none")
RUNS_ROOT = "runs/finetune"


def published_schedule() -> TrainConfig:
    """MedSapiens' per-dataset schedule: 210 epochs (lr x0.1 at 170 and 200, OptimConfig's
    defaults), validated and checkpointed every 10 epochs' worth of steps at the published
    global batch of 8 (2 per GPU x 4 GPUs); set data.micro_batch / train.grad_accum to match."""
    return TrainConfig(epochs=210.0, max_steps=0, val_every=500, checkpoint_every=500, keep_last=1)


@dataclass
class FinetuneConfig:
    """init: `bundle` (a pretrained bundle; its architecture wins over `model`), `sapiens` (a raw
    Sapiens checkpoint in model.checkpoint: the paper's "Sapiens + LoRA" baseline) or `scratch`.
    reinit_head: with a bundle that already has this dataset's head, start it afresh (what
    MedSapiens' fine-tuning effectively does: its 88-channel layer does not fit one dataset).
    shots: 0 trains on the whole train split, K > 0 on K images drawn by `shot_seed`; `seeds`
    lists several shot seeds to run one after another (their mean and std are reported).
    eval_split: the split evaluated at the end; `auto` takes `test`, else every `test*` split
    (ISBI 2015's test1 and test2), each reported; the first one is the run's headline. Splits joined
    by '+' (`test1+test2`) are scored as one, as `medsapiens evaluate --split` does.
    flip_test: average with the mirrored image at evaluation (as MedSapiens always does).
    calibration_coverage: the selected bundle's split conformal radii per landmark are calibrated on
    data.val_split at this coverage (0: none; skipped, and said, when the val split is too small).
    run_dir: empty for runs/finetune/<dataset>-<init>[-lora][-<K>shot]-<digest of what trains>, which the
    same command finds again (a rerun after a stop resumes there).
    resume: `auto` continues the run in run_dir when its settings are the same (refused otherwise);
    `none` moves an earlier run there aside (to <run_dir>.replaced-<time>) and starts afresh."""

    # Keys that act only after training (evaluation, calibration): a rerun may change them and still resume.
    AFTER_TRAINING: ClassVar[frozenset[str]] = frozenset({"eval_split", "flip_test", "eval_overlays",
                                                          "calibration_coverage"})
    # The keys naming the weights a run starts from: a rerun may name them otherwise when their sha256 is the same.
    STARTING_WEIGHTS: ClassVar[frozenset[str]] = frozenset({"model.checkpoint", "bundle"})
    RUN_DIR_CHOSEN_WHEN_EMPTY: ClassVar[bool] = True
    APPLIES_WHEN: ClassVar = {"reinit_head": ("init", "bundle"), **LAYER_DECAY_APPLIES_WHEN}

    run_dir: str = ""
    resume: str = "auto"
    dataset: str = ""
    init: str = "bundle"
    bundle: str = ""
    reinit_head: bool = False
    shots: int = 0
    shot_seed: int = 0
    seeds: list[int] = field(default_factory=list)
    eval_split: str = "auto"
    flip_test: bool = True
    eval_overlays: int = 0
    calibration_coverage: float = 0.9
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=published_schedule)
