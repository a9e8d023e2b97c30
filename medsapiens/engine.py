"""The DeepSpeed engine wrapper shared by pretraining and fine-tuning: distributed init, the
DeepSpeed config, optimiser and lr schedule, one training step, checkpoints and resume.

The same code runs as one process without the launcher (CPU or one GPU) and under
`deepspeed` on many ranks: only the environment differs.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from medsapiens.distributed import free_port

CLIENT_STATE_KEY = "medsapiens"
TAG_PREFIX = "step_"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    layer_decay: float = 0.85
    grad_clip: float = 1.0
    warmup_steps: int = 500
    warmup_factor: float = 0.001
    schedule: str = "step"
    milestones: tuple[float, float] = (170 / 210, 200 / 210)
    gamma: float = 0.1
    min_lr_factor: float = 0.0


@dataclass
class TrainConfig:
    max_steps: int = 1000
    stop_after: int = 0  # end this invocation at that step, checkpointed (0: run to max_steps)
    grad_accum: int = 1
    seed: int = 0
    precision: str = "auto"
    deepspeed: str = "launch/deepspeed/zero2.json"
    offload: bool = False
    log_every: int = 10
    val_every: int = 500
    checkpoint_every: int = 500
    keep_last: int = 3
    val_limit: int = 0
    val_panels: int = 4
    dist_timeout_s: int = 1800

    def check(self) -> None:
        """Settings that would break the run's guarantees, refused before it starts."""
        if self.keep_last < 1:
            raise ValueError(f"train.keep_last must be at least 1, got {self.keep_last}")
        if self.stop_after % self.checkpoint_every:
            # The data stream restarts on multiples of checkpoint_every; resuming elsewhere would
            # not continue the sample sequence of an uninterrupted run.
            raise ValueError(f"train.stop_after ({self.stop_after}) must be a multiple of train.checkpoint_every "
                             f"({self.checkpoint_every})")


def checkpoint_tag(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def tag_step(tag: str) -> int:
    return int(tag.removeprefix(TAG_PREFIX).removesuffix("_universal"))


def add_loss_sum(sums: dict, name: str, loss_sum, count: int) -> None:
    """Accumulate a dataset's (summed loss, sample count) in `sums`."""
    total, n = sums.get(name, (0.0, 0))
    sums[name] = (total + loss_sum, n + count)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the base lr after `step` optimizer steps: linear warm-up, then step or cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.warmup_factor + (1 - cfg.warmup_factor) * step / cfg.warmup_steps
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= m * max_steps for m in cfg.milestones)
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "constant":
        return 1.0
    raise ValueError(f"optim.schedule must be 'step', 'cosine' or 'constant', got {cfg.schedule!r}")


def resolve_file(path: str) -> Path:
    """A path as given, else relative to the installed package root (where `launch/` lives)."""
    for candidate in (Path(path), PACKAGE_ROOT / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"file not found: {path} (also looked under {PACKAGE_ROOT})")


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU); returns (rank, world)."""
    import deepspeed

    # DeepSpeed's ZeRO calls a torch collective that torch now flags as deprecated, once per step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    if "RANK" not in os.environ:  # a plain single process, not started by a launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


def deepspeed_config(train: TrainConfig, optim: OptimConfig, micro_batch: int, universal: bool = False) -> dict:
    """The DeepSpeed config: ZeRO settings from the JSON file, the batch, clipping, precision and
    optimizer from the experiment config (which wins over the JSON's defaults for those keys)."""
    source = resolve_file(train.deepspeed)
    cfg = json.loads(source.read_text())
    owned = {"optimizer", "scheduler", "train_batch_size", "bf16", "fp16"} & set(cfg)
    if owned:
        raise ValueError(f"{source}: {sorted(owned)} come from the experiment config, remove them from the JSON")
    cfg.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=train.grad_accum,
        gradient_clipping=optim.grad_clip,
        optimizer={"type": "AdamW", "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                                               "weight_decay": optim.weight_decay}},
        bf16={"enabled": resolve_precision(train.precision) == "bf16"},
        steps_per_print=10**9,
    )
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if train.offload:
        zero.setdefault("offload_optimizer", {"device": "cpu"})
        if zero.get("stage", 0) == 3:
            zero.setdefault("offload_param", {"device": "cpu"})
    for key in ("offload_optimizer", "offload_param"):
        if key in zero:
            zero[key]["pin_memory"] = bool(zero[key].get("pin_memory")) and torch.cuda.is_available()
    if universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints, oldest first (DeepSpeed writes `latest` only after a save completes)."""
    if not (ckpt_dir / "latest").is_file():
        return []
    tags = sorted(p.name for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir() and not p.name.endswith("_universal"))
    latest = (ckpt_dir / "latest").read_text().strip()
    return [t for t in tags if t <= latest]


class Engine:
    """A DeepSpeed engine around the landmark model, with our schedule and checkpoint conventions."""

    def __init__(self, model, param_groups: list[dict], train: TrainConfig, optim: OptimConfig,
                 micro_batch: int, universal: bool = False):
        import deepspeed

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

    @property
    def device(self) -> torch.device:
        return self.ds.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def to_device(self, batch: dict) -> dict:
        moved = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        moved["images"] = moved["images"].to(self.dtype)
        return moved

    def train_step(self, micro_batches: list[dict], loss_fn) -> dict:
        """Forward/backward over the accumulation micro-batches and one optimizer step.

        Returns per dataset the summed loss (a tensor: no host sync per step) and the sample count,
        for exact averaging across ranks at logging time, and the gradient norm.
        """
        self.ds.train()
        per_dataset: dict = {}
        for batch in micro_batches:
            batch = self.to_device(batch)
            outputs = self.ds(batch["images"], batch["dataset_index"])
            loss = loss_fn(outputs, batch["target_heatmaps"], batch["target_weights"])
            self.ds.backward(loss.total)
            self.ds.step()
            for name, count in loss.counts.items():
                if count:
                    add_loss_sum(per_dataset, name, loss.per_dataset[name] * count, count)
        return {"per_dataset": per_dataset, "grad_norm": self.ds.get_global_grad_norm()}

    def group_lrs(self) -> dict[str, float]:
        """Current lr per part, the lowest of its groups: for the backbone that is the embedding
        layer, the most decayed (decoder lr x layer_decay^(depth+1)); the decoder has one lr."""
        lrs: dict[str, float] = {}
        for group in self.optimizer.param_groups:
            tag = group.get("part", "all")
            lrs[tag] = min(lrs.get(tag, math.inf), group["lr"])
        return lrs

    def save(self, ckpt_dir: Path, step: int, client_state: dict, keep: set[str] = frozenset()) -> None:
        """Every rank calls this; rank 0 then prunes to the last `keep_last` complete checkpoints
        (tags in `keep`, such as the best one, are never pruned)."""
        self.ds.save_checkpoint(str(ckpt_dir), tag=checkpoint_tag(step), client_state={CLIENT_STATE_KEY: client_state})
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            for old in set(checkpoint_tags(ckpt_dir)[:-self.train_cfg.keep_last]) - set(keep):
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        torch.distributed.barrier()

    def load(self, ckpt_dir: Path) -> dict | None:
        """Load the last complete checkpoint (or the universal one when so configured)."""
        path, client = self.ds.load_checkpoint(str(ckpt_dir))
        if path is None:
            return None
        return (client or {}).get(CLIENT_STATE_KEY, {})


def shutdown() -> None:
    """End cleanly: ZeRO-3 on CPU aborts at exit without a final barrier and group teardown."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def latest_tag(ckpt_dir: Path) -> str:
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir} (no 'latest' file)")
    return latest.read_text().strip()


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model, gathered from the ZeRO partitions of every rank."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (Path(ckpt_dir) / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag!r} in {ckpt_dir}")
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def make_universal(ckpt_dir: Path, tag: str | None = None) -> str:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format, loadable at another world size.

    Writes `<tag>_universal/` and points `latest_universal` at it; resume with `--resume universal`.
    """
    import subprocess
    import sys

    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    out_tag = f"{tag}_universal"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                    "--input_folder", str(ckpt_dir / tag), "--output_folder", str(ckpt_dir / out_tag),
                    "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"],
                   check=True)
    (ckpt_dir / "latest_universal").write_text(out_tag)
    return out_tag
