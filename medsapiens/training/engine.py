"""The DeepSpeed engine wrapper shared by pretraining and fine-tuning: the DeepSpeed config,
optimiser and lr schedule, and one training step (forward, backward, step). It knows nothing of landmarks: the loss comes from the model's objective (medsapiens.model.loss),
checkpoints from medsapiens.training.checkpoints.

The same code runs as one process without the launcher (CPU or one GPU) and under
`deepspeed` on many ranks: only the environment differs.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import ClassVar

import torch

from medsapiens import distributed
from medsapiens.config import ABOVE_ZERO, a_seed, at_least, positive
from medsapiens.errors import InputError
from medsapiens.io import jsondoc
from medsapiens.training import checkpoints

LOSS_AVERAGES = ("per_sample", "union")
SCHEDULES = ("step", "cosine", "constant")

PRESETS = resources.files("medsapiens.training") / "deepspeed"  # zero1, zero2, zero3, zero3_offload
LEGACY_PRESET_DIR = Path("launch/deepspeed")  # where the presets were; older run configs name them there


@dataclass
class OptimConfig:
    """warmup_steps: None takes the published 500 steps, shortened to a fifth of a shorter run
    (`resolve_warmup`); a number is used as given."""

    APPLIES_WHEN: ClassVar = {"milestones": ("schedule", "step"), "gamma": ("schedule", "step"),
                              "min_lr_factor": ("schedule", "cosine"), "warmup_factor": ("warmup_steps", ABOVE_ZERO)}

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    layer_decay: float = 0.85
    grad_clip: float = 1.0
    warmup_steps: int | None = None
    warmup_factor: float = 0.001
    schedule: str = "step"
    milestones: tuple[float, float] = (170 / 210, 200 / 210)
    gamma: float = 0.1
    min_lr_factor: float = 0.0

    def check(self) -> None:
        if self.schedule not in SCHEDULES:
            raise InputError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        positive("optim.lr", self.lr)
        positive("optim.eps", self.eps)
        if not all(0 <= b < 1 for b in self.betas):
            raise InputError(f"optim.betas must be in [0, 1), got {list(self.betas)}")
        for key in ("weight_decay", "grad_clip", "warmup_steps", "min_lr_factor"):
            if getattr(self, key) is not None and not getattr(self, key) >= 0:  # also refuses NaN
                raise InputError(f"optim.{key} must be at least 0, got {getattr(self, key)}")
        for key in ("layer_decay", "warmup_factor", "gamma"):
            if not 0 < getattr(self, key) <= 1:
                raise InputError(f"optim.{key} must be in (0, 1], got {getattr(self, key)}")
        if not (all(0 < m <= 1 for m in self.milestones) and list(self.milestones) == sorted(self.milestones)):
            raise InputError(f"optim.milestones are fractions of the run, ascending in (0, 1] (170/210 is epoch 170 "
                             f"of 210), got {list(self.milestones)}")


@dataclass
class TrainConfig:
    """epochs > 0 sets max_steps to ceil(epochs x ceil(training images / global batch)) at start (the
    published recipes count epochs); a config or override giving one of the two sets the other to 0;
    both above 0 must agree (a run's saved config.yaml holds both). loss: how a mixed batch is averaged
    (see model/loss.py)."""

    ONE_OF: ClassVar = (("epochs", "max_steps"),)

    max_steps: int = 1000
    epochs: float = 0.0
    stop_after: int = 0  # end this invocation at that step, checkpointed (0: run to max_steps)
    grad_accum: int = 1
    seed: int = 0
    precision: str = "auto"
    deepspeed: str = "zero2"  # a preset (zero1, zero2, zero3, zero3_offload) or a DeepSpeed JSON file
    offload: bool = False
    compile: bool = False  # torch.compile each transformer block and the decoder trunk (the model's regions)
    log_every: int = 10
    val_every: int = 500
    checkpoint_every: int = 500
    keep_last: int = 3
    val_limit: int = 0  # validate on the first N images of each val split, in shard order (0: all)
    val_panels: int = 4
    dist_timeout_s: int = 1800
    loss: str = "per_sample"

    def check(self) -> None:
        """Settings that would break the run's guarantees, refused before it starts."""
        if self.loss not in LOSS_AVERAGES:
            raise InputError(f"train.loss must be one of {', '.join(LOSS_AVERAGES)}, got {self.loss!r}")
        for key in ("grad_accum", "checkpoint_every", "log_every", "val_every", "keep_last"):
            at_least(f"train.{key}", getattr(self, key), 1)
        at_least("train.max_steps", self.max_steps, 0)
        at_least("train.stop_after", self.stop_after, 0)
        a_seed("train.seed", self.seed)
        at_least("train.dist_timeout_s", self.dist_timeout_s, 1)
        at_least("train.val_limit", self.val_limit, 0)
        at_least("train.val_panels", self.val_panels, 0)
        if not self.epochs >= 0 or (not self.epochs and self.max_steps < 1):
            raise InputError(f"give train.epochs > 0 or train.max_steps >= 1 (got epochs {self.epochs}, "
                             f"max_steps {self.max_steps})")
        if self.stop_after % self.checkpoint_every:
            # The data stream restarts on multiples of checkpoint_every; resuming elsewhere would
            # not continue the sample sequence of an uninterrupted run.
            raise InputError(f"train.stop_after ({self.stop_after}) must be a multiple of train.checkpoint_every "
                             f"({self.checkpoint_every})")


PUBLISHED_WARMUP_STEPS = 500
WARMUP_SHARE = 0.2  # the published schedules warm up for 3-14% of their steps


def whole_steps(steps: float) -> int:
    """A step count computed in floating point, rounded up: the whole number it meant when it lands just
    above one (0.14 epochs x 50 steps is 7.000000000000001 steps: 7, not 8)."""
    return math.ceil(steps - 1e-9)


def drop_steps(optim: OptimConfig, max_steps: int) -> list[int]:
    """The steps at which a step schedule's lr drops (milestones are fractions of the run)."""
    return [whole_steps(m * max_steps) for m in optim.milestones] if optim.schedule == "step" else []


def first_drop(optim: OptimConfig, max_steps: int) -> int | None:
    """The step of the first lr drop of a step schedule (None for the others)."""
    return min(drop_steps(optim, max_steps), default=None)


def resolve_warmup(optim: OptimConfig, max_steps: int) -> tuple[OptimConfig, str]:
    """The optimizer config with its warm-up in steps for a run of `max_steps`, and a note on it for
    the printed schedule ("" when there is nothing to say). Unset, the warm-up is the published 500
    steps, at most a fifth of the run: a short run would otherwise never reach its lr."""
    if optim.warmup_steps is not None:  # it reaches the base lr at step warmup_steps - 1
        drop = first_drop(optim, max_steps)
        if drop is not None and optim.warmup_steps > drop:
            return optim, f" (warning: optim.warmup_steps reaches the first lr drop at step {drop})"
        if optim.warmup_steps > max_steps:
            return optim, f" (warning: optim.warmup_steps outlasts the {max_steps}-step run: the lr never reaches its base)"
        return optim, ""
    steps = min(PUBLISHED_WARMUP_STEPS, whole_steps(WARMUP_SHARE * max_steps))
    scaled = steps < PUBLISHED_WARMUP_STEPS
    note = (f" (the published {PUBLISHED_WARMUP_STEPS} shortened to a fifth of this {max_steps}-step run; "
            "optim.warmup_steps sets it)") if scaled else ""
    return replace(optim, warmup_steps=steps), note


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the base lr after `step` optimizer steps: a linear warm-up times step decay
    (the two multiply, as mmengine's LinearLR and MultiStepLR do: a run shorter than its warm-up
    still drops at the milestones), or warm-up then cosine, or constant. A warm-up of W > 1 steps reaches
    the base lr at its last step, W - 1, as mmengine's LinearLR (total_iters = end - begin - 1) does."""
    ramp = step / max(1, cfg.warmup_steps - 1)
    warmup = cfg.warmup_factor + (1 - cfg.warmup_factor) * ramp if step < cfg.warmup_steps else 1.0
    if cfg.schedule == "step":
        return warmup * cfg.gamma ** sum(step >= drop for drop in drop_steps(cfg, max_steps))
    if step < cfg.warmup_steps:
        return warmup
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "constant":
        return 1.0
    raise InputError(f"optim.schedule must be 'step', 'cosine' or 'constant', got {cfg.schedule!r}")


def current_spelling(deepspeed: str) -> str:
    """train.deepspeed as written now: `launch/deepspeed/zero2.json` (older runs' spelling) is `zero2`."""
    return Path(deepspeed).stem if Path(deepspeed).parent == LEGACY_PRESET_DIR else deepspeed


def deepspeed_file(value: str):
    """train.deepspeed: a preset shipped with the package (`zero2`), or a JSON file of the user's."""
    preset = PRESETS / f"{current_spelling(value)}.json"
    if preset.is_file():
        return preset
    if Path(value).is_file():
        return Path(value)
    presets = ", ".join(sorted(f.name.removesuffix(".json") for f in PRESETS.iterdir() if f.name.endswith(".json")))
    raise FileNotFoundError(f"file not found: {value} (presets: {presets})")


def read_deepspeed_json(value: str) -> tuple[Path, dict]:
    """train.deepspeed's file and its JSON object (a file that is missing, or not such an object, is one
    line naming it)."""
    try:
        source = deepspeed_file(value)
    except FileNotFoundError as exc:
        raise InputError(f"train.deepspeed: {exc}") from None
    cfg = jsondoc.read(source, f"train.deepspeed {source}")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("zero_optimization", {}), dict):
        raise InputError(f"train.deepspeed {source}: not a DeepSpeed config (a JSON object, zero_optimization one too)")
    return source, cfg


def zero_stage(deepspeed: dict):
    """A DeepSpeed config's ZeRO stage, as DeepSpeed reads it (0 when not given)."""
    return deepspeed.get("zero_optimization", {}).get("stage", 0)


def check_zero_stage(train: TrainConfig, frozen_weights: bool) -> None:
    """A ZeRO stage whose checkpoints an export can read back whole: stage 0 writes no ZeRO files, and
    stage 1 leaves frozen weights out (DeepSpeed saves them from stage 2 on); either would train for
    nothing, failing only at the export."""
    stage = zero_stage(read_deepspeed_json(train.deepspeed)[1])
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise InputError(f"train.deepspeed {train.deepspeed}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if stage == 0:
        raise InputError(f"train.deepspeed {train.deepspeed}: ZeRO stage 0 writes checkpoints no export can read; use a "
                         "preset (zero1, zero2, zero3) or set zero_optimization.stage")
    if stage == 1 and frozen_weights:
        raise InputError(f"train.deepspeed {train.deepspeed}: ZeRO-1 checkpoints leave out frozen weights (with LoRA, the "
                         "backbone's), so the run could not be exported; use zero2 or zero3")


def resolve_precision(precision: str) -> str:
    if precision == "auto":  # bf16 where the GPU computes in it (Ampere and later), not where it is emulated
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise InputError(f"train.precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


def emulated_bf16_warning(precision: str) -> str | None:
    """A line for bf16 asked of a GPU that only emulates it (before Ampere: V100, T4), where it is slower."""
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        return (f"warning: train.precision bf16 on a {torch.cuda.get_device_name()}, which only emulates bf16 (slower "
                "than fp32): train.precision=auto trains in fp32 there")
    return None


def deepspeed_config(train: TrainConfig, optim: OptimConfig, micro_batch: int, universal: bool = False) -> dict:
    """The DeepSpeed config: ZeRO settings from the JSON file, the batch, clipping, precision and
    optimizer from the experiment config (which wins over the JSON's defaults for those keys)."""
    source, cfg = read_deepspeed_json(train.deepspeed)
    owned = {"optimizer", "scheduler", "train_batch_size", "bf16", "fp16"} & set(cfg)
    if owned:
        raise InputError(f"{source}: {sorted(owned)} come from the experiment config, remove them from the JSON")
    experiment = {"train_micro_batch_size_per_gpu": ("data.micro_batch", micro_batch),
                  "gradient_accumulation_steps": ("train.grad_accum", train.grad_accum),
                  "gradient_clipping": ("optim.grad_clip", optim.grad_clip)}
    replaced = [f"{key} {cfg[key]!r} by {name}={value}" for key, (name, value) in experiment.items()
                if cfg.get(key, "auto") not in ("auto", value)]
    if replaced and source.parent != PRESETS and distributed.rank() == 0:  # the presets' values are placeholders
        print(f"note: train.deepspeed {source}: the experiment config sets {', '.join(replaced)}", file=sys.stderr)
    cfg.update(
        {key: value for key, (_, value) in experiment.items()},
        optimizer=optimizer_config(optim),
        bf16={"enabled": resolve_precision(train.precision) == "bf16"},
        steps_per_print=10**9,
    )
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if train.compile and zero.get("stage", 0) == 3:
        raise InputError(f"train.compile with ZeRO-3 ({source.name}) would run mostly eager: ZeRO-3's hooks on every "
                         "submodule break each compiled block's graph; use a ZeRO-1/2 preset or train.compile=false")
    if train.offload:
        zero.setdefault("offload_optimizer", {"device": "cpu"})
        if zero.get("stage", 0) == 3:
            zero.setdefault("offload_param", {"device": "cpu"})
    for key in ("offload_optimizer", "offload_param"):
        if key in zero:  # pinned unless the JSON says otherwise: pageable host memory halves the copies' speed
            zero[key]["pin_memory"] = bool(zero[key].get("pin_memory", True)) and torch.cuda.is_available()
    if universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def optimizer_config(optim: OptimConfig) -> dict:
    """PyTorch's fused AdamW (`torch_adam`), never DeepSpeed's FusedAdam or CPUAdam: those are C++/CUDA
    ops that DeepSpeed compiles at a run's first step, which needs a compiler and the CUDA toolkit on
    every node (and fails on some toolkits). PyTorch's fused kernel serves GPU states and CPU ones
    (ZeRO-Offload, CPU runs) alike."""
    return {"type": "AdamW", "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                                        "weight_decay": optim.weight_decay, "torch_adam": True, "fused": True}}


def forget_zero3_model(module) -> None:
    """ZeRO-3 (DeepSpeed 0.19.8) keeps a model reachable after `destroy` from module-level state, and
    through the model's hooks its engine: the bottom of its stack of modules in forward, and the
    parameter coordinator's class-level lru_cache keyed by module."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])  # both looked up softly: DeepSpeed's internals
    stack[:] = [m for m in stack if m is not module]
    cached = vars(PartitionedParameterCoordinator).get("_PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(cached, "__closure__", None) or ():  # the lru_cache sits under DeepSpeed's nvtx wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


class Engine:
    """A DeepSpeed engine around a model, with our lr schedule and checkpoint conventions."""

    def __init__(self, model, param_groups: list[dict], train: TrainConfig, optim: OptimConfig,
                 micro_batch: int, universal: bool = False):
        import deepspeed

        optim, _ = resolve_warmup(optim, train.max_steps)
        self.train_cfg, self.optim_cfg = train, optim
        self.precision = resolve_precision(train.precision)
        for group in param_groups:
            group["lr"] = optim.lr * group.get("lr_scale", 1.0)
        self.config = deepspeed_config(train, optim, micro_batch, universal)

        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, optim, train.max_steps))

        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups, config=self.config, lr_scheduler=scheduler)
        self.zero_stage = self.ds.zero_optimization_stage()
        self.compiled_regions = model.compile_regions() if train.compile else 0
        checkpoints.prepare(self.ds)

    def close(self) -> None:
        """Give back what the engine holds. DeepSpeed's gradient hooks on every parameter keep the engine,
        its optimizer states and buckets alive, garbage or not, until this: a process that trains again
        (fine-tuning seeds) would otherwise hold one copy of them per run on its GPU."""
        module = self.ds.module
        self.ds.destroy()
        if self.zero_stage == 3:
            forget_zero3_model(module)

    def save(self, ckpt_dir: Path, step: int, client_state: dict, keep: set[str] = frozenset()) -> None:
        checkpoints.save(self.ds, ckpt_dir, step, client_state, self.train_cfg.keep_last, keep)

    def load(self, ckpt_dir: Path, tag: str) -> dict | None:
        return checkpoints.load(self.ds, ckpt_dir, tag)

    @property
    def device(self) -> torch.device:
        return self.ds.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, micro_batches: list[dict], objective) -> tuple[list[dict], torch.Tensor | None]:
        """Forward/backward over the accumulation micro-batches and one optimizer step.

        `objective(forward, batch, dtype) -> (loss, stats)` computes the loss of one micro-batch;
        returns each micro-batch's stats and the gradient norm.
        """
        self.ds.train()
        stats = []
        for batch in micro_batches:
            loss, batch_stats = objective(self.ds, self.to_device(batch), self.dtype)
            self.ds.backward(loss)
            self.ds.step()
            stats.append(batch_stats)
        return stats, self.ds.get_global_grad_norm()

    def group_lrs(self) -> dict[str, float]:
        """The lr per part that the next update uses, the lowest of its groups: for the backbone that is the embedding
        layer, the most decayed (decoder lr x layer_decay^(depth+1)); the decoder and LoRA
        adapters have one lr each."""
        lrs: dict[str, float] = {}
        for group in self.optimizer.param_groups:
            tag = group.get("part", "all")
            lrs[tag] = min(lrs.get(tag, math.inf), group["lr"])
        return lrs
