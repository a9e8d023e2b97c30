"""Assembling a training run, the one path both stages take: schedule, LoRA, optimiser groups,
the DeepSpeed engine, the run files, then the shared loop.

Pretraining and fine-tuning differ only in what they hand over (the model with its heads, the
manifest, the datasets, whether the best validation checkpoint is kept).
"""
from __future__ import annotations

import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import yaml

from medsapiens import config as configlib
from medsapiens import distributed
from medsapiens.data.pipeline import DataConfig, epoch_images, mixture_weights, validation_split
from medsapiens.errors import InputError
from medsapiens.io import jsondoc
from medsapiens.io.locks import writer_lock
from medsapiens.io.manifest import Manifest, check_scorable
from medsapiens.io.shard_tar import file_digest
from medsapiens.model import (
    LandmarkModel,
    LoraConfig,
    ModelConfig,
    apply_lora,
    count_trainable,
    forward_flops,
    merge_lora,
    param_groups,
    training_flops,
)
from medsapiens.training import checkpoints
from medsapiens.training.checkpoints import consolidated_state_dict
from medsapiens.training.engine import (
    Engine,
    OptimConfig,
    TrainConfig,
    check_zero_stage,
    current_spelling,
    drop_steps,
    emulated_bf16_warning,
    read_deepspeed_json,
    resolve_precision,
    resolve_warmup,
    whole_steps,
    zero_stage,
)
from medsapiens.training.memory import memory_plan
from medsapiens.training.trainer import (
    RESOLVED_CONFIG,
    RESOLVED_DEEPSPEED,
    RUN_INFO,
    RunContext,
    Trainer,
    write_run_files,
)


class StageConfig(Protocol):
    """What the run reads of a stage's config (PretrainConfig, FinetuneConfig: dataclasses)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    run_dir: str
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    train: TrainConfig
    lora: LoraConfig


@dataclass
class RunPlan:
    """What a stage trains."""

    stage: str
    cfg: StageConfig
    manifest: Manifest
    dataset_ids: list[str]
    model: LandmarkModel
    model_cfg: ModelConfig
    track_best: bool = False
    info: dict = field(default_factory=dict)  # extra run.json entries
    start_digest: str | None = None  # sha256 of the weights file the run starts from, held on resume (rank 0's)


@dataclass
class RunResult:
    """What a finished run hands back, the same on every rank."""

    best: dict | None  # the best validation checkpoint (when tracked and there was a val split)
    last_validation: dict
    selection: dict
    trainable_parameters: int
    device: torch.device
    finished: bool  # False when train.stop_after ended it before the schedule's last step
    config: Any  # the stage config resolved (steps, precision, warm-up), as config.yaml records it


def check_settings(cfg) -> None:
    """Every number and choice of a stage config that can be known wrong before a rank starts;
    each error names its key."""
    check_run_dir(cfg.run_dir, empty_allowed=getattr(cfg, "RUN_DIR_CHOSEN_WHEN_EMPTY", False))
    cfg.model.check()
    cfg.lora.check()
    cfg.data.check()
    cfg.optim.check()
    cfg.train.check()
    check_zero_stage(cfg.train, frozen_weights=cfg.lora.enabled)


def check_run_dir(run_dir: str, empty_allowed: bool) -> None:
    """A folder of the run's own, never the current folder or one above it (a fresh start moves the run
    directory aside); empty only where the stage then chooses one."""
    if run_dir == "" and empty_allowed:
        return
    here = Path.cwd().resolve()
    if Path(run_dir).resolve() in (here, *here.parents):
        raise InputError(f"run_dir must name a folder of the run's own, not the current folder or one above it; "
                         f"got {run_dir!r}")


def global_batch(cfg) -> int:
    return cfg.data.micro_batch * cfg.train.grad_accum * distributed.world_size()


def scheduled(train: TrainConfig, train_images: int, batch: int) -> tuple[TrainConfig, str]:
    """train.epochs -> max_steps (ceil(epochs x ceil(images / global batch))); and the schedule in words. A
    max_steps given too must be that count (a run's saved config.yaml holds both)."""
    if train.epochs:
        steps_per_epoch = math.ceil(train_images / batch)
        steps = whole_steps(train.epochs * steps_per_epoch)
        if train.max_steps and train.max_steps != steps:
            raise InputError(f"train.epochs ({train.epochs:g}) gives {steps} steps here ({train_images} training images / "
                             f"global batch {batch}), train.max_steps says {train.max_steps}: give one and set the other to 0")
        train = replace(train, max_steps=steps)
        head = (f"{train.epochs:g} epochs x {steps_per_epoch} steps ({train_images} training images / global "
                f"batch {batch}) = {train.max_steps} steps")
    else:
        head = f"{train.max_steps} steps (global batch {batch})"
    return train, head


def schedule_text(optim: OptimConfig, head: str, max_steps: int, warmup_note: str = "") -> str:
    text = f"schedule: {head}; warm-up {optim.warmup_steps} steps from x{optim.warmup_factor:g}{warmup_note}"
    if optim.schedule == "step":
        drops = drop_steps(optim, max_steps)
        late = sum(drop >= max_steps for drop in drops)
        never = f" ({late} of them at the run's last step or later: never applied)" if late else ""
        return f"{text}, then lr x{optim.gamma:g} after steps {', '.join(map(str, drops))}{never}"
    return f"{text}, then {optim.schedule}"


def validated_on(manifest: Manifest, dataset_ids: list[str], split: str) -> dict[str, str | None]:
    """Each dataset's validation split (None where it has none). A split other than the default that none
    of them has is refused: a typo would leave the run without validation."""
    found = {d: validation_split(manifest, d, split) for d in dataset_ids}
    if split != DataConfig.val_split and not any(found.values()):
        has = "; ".join(f"{d}: {', '.join(manifest.datasets[d].splits)}" for d in dataset_ids)
        raise InputError(f"data.val_split={split!r} is a split of none of the datasets trained ({has})")
    return found


def selection(plan: RunPlan) -> dict:
    """Which split chooses the exported checkpoint (recorded in run.json and the bundle)."""
    split = plan.cfg.data.val_split
    found = validated_on(plan.manifest, plan.dataset_ids, split)
    if not plan.track_best:
        validated = [d for d, found_split in found.items() if found_split]
        on = f"on {split!r} of {', '.join(validated)}" if validated else f"none: no {split!r} split"
        rule, chosen = f"none: the last checkpoint is exported; validation ({on}) is only logged", None
    elif all(found.values()):
        rule, chosen = "the checkpoint with the lowest val MRE", split
    else:
        rule, chosen = f"none: no {split!r} split to select on, the last checkpoint is exported", None
    return {"split": chosen, "validated_on": found, "rule": rule}


def one_validation_note(selects: bool, train_cfg: TrainConfig) -> str:
    """Said when a run that selects on val validates only at its last step: it has nothing to choose from."""
    if not selects or train_cfg.max_steps > train_cfg.val_every:
        return ""
    return (f" (one validation in this {train_cfg.max_steps}-step run, at its end: train.val_every is "
            f"{train_cfg.val_every}, so the last checkpoint is the one kept)")


PUBLISHED_GLOBAL_BATCH = 8  # MedSapiens and Sapiens pose: 2 images per GPU on 4 GPUs

# Keys a rerun may change and still continue the same run: none changes what trains (run_dir: a
# run directory moved or copied elsewhere holds the same run; activation checkpointing recomputes the
# same activations, so a run out of GPU memory can continue with it).
RESUMABLE_CHANGES = {"run_dir", "train.stop_after", "train.log_every", "train.keep_last", "train.val_panels",
                     "train.dist_timeout_s", "model.grad_checkpointing", "resume"}
WORLD_SIZE_CHANGES = {"data.micro_batch", "train.grad_accum"}  # to keep the global batch on another number of ranks


def changes_a_resume_allows(cfg) -> set[str]:
    """RESUMABLE_CHANGES and the keys the stage's config acts on only after training (AFTER_TRAINING)."""
    return RESUMABLE_CHANGES | getattr(cfg, "AFTER_TRAINING", frozenset())


def training_settings_digest(cfg, identity: dict) -> str:
    """12 hex digits of the config's keys that a resume may not change, those `identity` names replaced by
    its values (what a path holds rather than the path; the ranks and the precision that resolve the
    schedule): the same for a rerun of the same command, with train.stop_after raised or dropped, or
    with another evaluation split."""
    allowed = changes_a_resume_allows(cfg)
    kept = {key: value for key, value in configlib.flatten(configlib.to_dict(cfg)).items() if key not in allowed}
    return configlib.json_digest({**kept, **identity})[:12]


def weights_digest(path: str | None) -> str | None:
    """The sha256 of the weights file a run starts from, on rank 0 (which decides a resume), else None."""
    if not path or distributed.rank() != 0:
        return None
    found = Path(path).resolve()
    stat = found.stat()
    return digest_of_unchanged_file(str(found), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def digest_of_unchanged_file(path: str, size: int, mtime_ns: int) -> str:
    """file_digest, once per file as long as its size and modification time stay (weights of gigabytes)."""
    return file_digest(Path(path))[0]


def check_same_global_batch(run_dir: Path, before: dict, ranks_before: int | None, cfg) -> None:
    """On another number of ranks the per-rank batch may change, the global batch may not: the step count
    and the lr schedule were set for it."""
    micro, accum = before.get("data", {}).get("micro_batch"), before.get("train", {}).get("grad_accum")
    if not (ranks_before and micro and accum):
        return
    was, now, ranks = micro * accum * ranks_before, global_batch(cfg), distributed.world_size()
    if was == now:
        return
    keep = (f"data.micro_batch x train.grad_accum = {was // ranks} keeps it on {ranks} rank(s)" if was % ranks == 0
            else f"{ranks} rank(s) cannot keep it: use a number of ranks that divides {was}")
    raise InputError(f"{run_dir} trained at a global batch of {was} ({micro} x {accum} x {ranks_before} rank(s)); "
                     f"this resume would train at {now} ({cfg.data.micro_batch} x {cfg.train.grad_accum} x "
                     f"{ranks} rank(s)): {keep}")


def saved_config(run_dir: Path) -> dict | None:
    """The resolved config a run saved in run_dir (config.yaml), or None where none was saved."""
    saved = Path(run_dir) / RESOLVED_CONFIG
    return (yaml.safe_load(saved.read_text()) or {}) if saved.is_file() else None


def check_same_run(run_dir: Path, cfg, resume: str, manifest_digest: str, start_digest: str | None = None) -> None:
    """A rerun that resumes continues the run in run_dir, so its resolved config must be the one saved
    there (the keys of RESUMABLE_CHANGES and the stage config's AFTER_TRAINING aside, and those neither
    reads: a key unread now was unread there too, or the setting it depends on differs; with `universal`,
    which resumes on another number of ranks, also those of WORLD_SIZE_CHANGES), on the same shard
    manifest, from the same starting weights: data.shards and model.checkpoint may name them elsewhere
    when their sha256 is the one the run recorded. Raises naming each difference, before anything in
    run_dir is rewritten."""
    if resume == "none" or not checkpoints.tags(checkpoints.checkpoint_dir(run_dir)):
        return
    before = saved_config(run_dir)
    if before is None:
        return
    if isinstance(before.get("train"), dict) and "deepspeed" in before["train"]:
        before["train"]["deepspeed"] = current_spelling(before["train"]["deepspeed"])
    if isinstance(before.get("train"), dict) and before["train"].get("precision") == "auto":  # saved unresolved
        before["train"]["precision"] = cfg.train.precision
    cfg = replace(cfg, train=replace(cfg.train, deepspeed=current_spelling(cfg.train.deepspeed)))
    info = json.loads((run_dir / RUN_INFO).read_text()) if (run_dir / RUN_INFO).is_file() else {}
    trained_on, started_from = info.get("manifest", {}).get("sha256"), info.get("start_sha256")
    found_elsewhere = ({"data.shards"} if trained_on and trained_on == manifest_digest else set()) | (
        getattr(cfg, "STARTING_WEIGHTS", {"model.checkpoint"}) if started_from and started_from == start_digest
        else set())  # moved, or spelled otherwise
    may_change = (changes_a_resume_allows(cfg) | found_elsewhere | set(configlib.unread_keys(cfg))
                  | (WORLD_SIZE_CHANGES if resume == "universal" else set()))
    differing = {k: v for k, v in configlib.differences(before, cfg).items() if k not in may_change}
    if differing:
        shown = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in list(differing.items())[:8])
        scope = (f" (resuming on another number of ranks, only {', '.join(sorted(WORLD_SIZE_CHANGES))} may change; "
                 "an epoch schedule keeps its length only at the same global batch)" if resume == "universal" else
                 f" (a pretraining run changes these through `medsapiens pretrain universal {run_dir}` and "
                 "--resume universal)" if set(differing) <= WORLD_SIZE_CHANGES else "")
        raise InputError(f"{run_dir} holds a run with other settings ({shown}{'; ...' if len(differing) > 8 else ''}): "
                         f"rerun with its settings to resume it{scope}, or start afresh in another run directory "
                         "(or with --resume none)")
    check_same_zero_stage(run_dir, cfg)
    if resume == "universal":
        check_same_global_batch(run_dir, before, info.get("world_size"), cfg)
    afresh = "start afresh in another run directory (or with --resume none)"
    if trained_on and trained_on != manifest_digest:
        raise checkpoints.CheckpointError(
            f"{run_dir} holds a run trained on another shard manifest (sha256 {trained_on[:12]}, now "
            f"{manifest_digest[:12]}): resume it on its shards, or {afresh}")
    if started_from and start_digest and started_from != start_digest:
        raise checkpoints.CheckpointError(
            f"{run_dir} holds a run that started from other weights (sha256 {started_from[:12]}, now "
            f"{start_digest[:12]}: the file it started from was replaced since): resume it from those, or {afresh}")


def check_same_zero_stage(run_dir: Path, cfg) -> None:
    """A JSON file of the user's (train.deepspeed) may change under its name between reruns; a checkpoint
    does not resume under another ZeRO stage than the one in the run's resolved DeepSpeed config."""
    saved = run_dir / RESOLVED_DEEPSPEED
    if not saved.is_file():
        return
    was, now = (zero_stage(zero) if isinstance(zero, dict) else None
                for zero in (jsondoc.read(saved, str(saved)), read_deepspeed_json(cfg.train.deepspeed)[1]))
    if was != now:
        raise InputError(f"{run_dir} trained under ZeRO stage {was} ({saved.name}); train.deepspeed "
                         f"{cfg.train.deepspeed} now asks for stage {now}: a checkpoint does not resume under another "
                         "stage. Give the file its stage back to resume, or start afresh in another run directory "
                         "(or with --resume none)")


def check_resumable(run_dir: Path, stage: str, resume: str) -> None:
    """A rerun that resumes (`auto`) a ZeRO checkpoint must have as many ranks as saved it: DeepSpeed cannot
    split the optimizer states anew (its load stops with a traceback). One that resumes `universal` loads
    the conversion of the newest checkpoint. Raises naming what differs and the way out."""
    ckpt_dir = checkpoints.checkpoint_dir(run_dir)
    if resume == "universal":
        checkpoints.current_universal(ckpt_dir)
        return
    if resume != "auto" or not checkpoints.has_checkpoint(ckpt_dir):
        return
    tag = checkpoints.latest_tag(ckpt_dir)
    saved, now = checkpoints.saved_world_size(ckpt_dir / tag), distributed.world_size()
    if saved is None or saved == now:
        return
    way_out = (f"convert it with `medsapiens pretrain universal {run_dir}`, then rerun with --resume universal "
               "(any number of ranks)" if stage == "pretrain" else
               "start afresh with --resume none (resume=none; the run is moved aside)")
    raise checkpoints.CheckpointError(
        f"checkpoint {ckpt_dir / tag} was saved by {saved} rank(s), this run has {now}: ZeRO's optimizer states "
        f"resume only on as many ranks as saved them; rerun on {saved} rank(s), or {way_out}")


def settled_resume(run_dir: Path, cfg, resume: str) -> str:
    """`universal` once the run resumed from its conversion has saved a checkpoint of its own on as many ranks
    as now, with the per-rank batch it has now: that newest one resumes (`auto`), so a stopped run goes on
    with the same command. Rank 0 decides."""
    ckpt_dir = checkpoints.checkpoint_dir(run_dir)

    def settle() -> str:
        if resume != "universal" or not checkpoints.has_checkpoint(ckpt_dir):
            return resume
        universal, newest = checkpoints.universal_tag(ckpt_dir), checkpoints.latest_tag(ckpt_dir)
        saved = saved_config(run_dir) or {}
        if (universal and checkpoints.tag_step(universal) < checkpoints.tag_step(newest)
                and checkpoints.saved_world_size(ckpt_dir / newest) == distributed.world_size()
                and not set(configlib.differences(saved, cfg)) & WORLD_SIZE_CHANGES):
            print(f"--resume universal: checkpoint {newest}, newer than the universal {universal}, was saved by "
                  f"{distributed.world_size()} rank(s), as many as now: resuming it as --resume auto does",
                  file=sys.stderr)
            return "auto"
        return resume

    return distributed.computed_on_rank0(settle)


def check_ranks_read_alike(cfg, manifest: Manifest, **more: str) -> None:
    """Right after the process group starts, before any decision a rank's own inputs steer: every rank read
    rank 0's config, shard manifest and DeepSpeed JSON (and `more`, name: identity) and resolves
    train.precision as rank 0 does. DeepSpeed copies rank 0's weights to every rank, but each rank's data,
    schedule, model shapes and ZeRO settings come from these: a host holding a stale copy at the same path
    trained on other data than config.yaml records, or hung."""
    distributed.check_same_on_every_rank(
        {"config": sha256_shown(configlib.digest(cfg)), "shard manifest": sha256_shown(manifest.digest),
         "DeepSpeed JSON": deepspeed_json_identity(cfg.train.deepspeed),
         "train.precision": resolve_precision(cfg.train.precision), **more},
        "each host must read the same files at the same paths (a stale copy?); on GPUs of mixed generations, set "
        "train.precision to fp32 or bf16")


def sha256_shown(digest: str) -> str:
    return f"sha256 {digest[:12]}"


def deepspeed_json_identity(deepspeed: str) -> str:
    try:
        return sha256_shown(configlib.json_digest(read_deepspeed_json(deepspeed)[1]))
    except InputError as exc:  # told beside rank 0's, or by every rank at the engine's start
        return f"unreadable ({exc})"


def train(plan: RunPlan, resume: str = "auto") -> RunResult:
    """Build the engine for plan.model, write the run files, train."""
    cfg = plan.cfg
    resume = settled_resume(Path(cfg.run_dir), cfg, resume)
    train_cfg, head = scheduled(cfg.train, epoch_images(plan.manifest, cfg.data, plan.dataset_ids), global_batch(cfg))
    train_cfg = replace(train_cfg, precision=resolve_precision(train_cfg.precision))  # `auto` as this machine has it
    if distributed.rank() == 0 and (warning := emulated_bf16_warning(train_cfg.precision)):
        print(warning, file=sys.stderr)
    optim, warmup_note = resolve_warmup(cfg.optim, train_cfg.max_steps)
    cfg = replace(cfg, train=train_cfg, optim=optim)
    run_dir = Path(cfg.run_dir)
    distributed.decide_on_rank0(  # before the engine's minutes
        lambda: check_same_run(run_dir, cfg, resume, plan.manifest.digest, plan.start_digest))
    distributed.decide_on_rank0(lambda: check_resumable(run_dir, plan.stage, resume))
    chosen = selection(plan)
    for dataset, split in chosen["validated_on"].items():
        if split:  # refused now, not at the first validation
            check_scorable(plan.manifest, dataset, split)
    lora: LoraConfig = cfg.lora
    if lora.enabled:
        apply_lora(plan.model, lora)
    model = plan.model.train()
    trainable, total = count_trainable(model), sum(p.numel() for p in model.parameters())
    engine = Engine(model, param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay), train_cfg,
                    cfg.optim, cfg.data.micro_batch, universal=resume == "universal")
    if distributed.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_files(run_dir, cfg, plan.stage, plan.manifest, plan.dataset_ids, selection=chosen,
                        lora=lora.enabled, trainable_parameters=trainable, parameters=total,
                        start_sha256=plan.start_digest, **plan.info)
        what = " (LoRA + decoder)" if lora.enabled else ""
        print(f"{plan.stage}: {trainable:,} of {total:,} parameters train{what}; "
              f"{schedule_text(optim, head, train_cfg.max_steps, warmup_note)}; checkpoint selection: {chosen['rule']}"
              f"{one_validation_note(chosen['split'] is not None, train_cfg)}", file=sys.stderr)
        if len(plan.dataset_ids) > 1:
            shares = mixture_weights(plan.manifest, cfg.data, plan.dataset_ids)
            print(f"mixing ({cfg.data.mixing}{', data.weights' if cfg.data.weights else ''}): " + ", ".join(
                f"{d} {share:.1%}" for d, share in zip(plan.dataset_ids, shares, strict=True)) + " of the samples",
                file=sys.stderr)
    heads_k = sum(plan.manifest.landmark_set(d).num_landmarks for d in plan.dataset_ids)
    flops = training_flops(forward_flops(plan.model_cfg.arch, plan.model_cfg.img_size, plan.model_cfg.trunk_width,
                                         heads_k), frozen_backbone=lora.enabled)
    memory = memory_plan(plan.model_cfg, heads_k, train_cfg.precision, engine.zero_stage, engine.config, lora.enabled)
    ctx = RunContext(run_dir, plan.manifest, plan.dataset_ids, plan.model_cfg.input_size, cfg.data, train_cfg,
                     configlib.digest(cfg), flops, track_best=plan.track_best, memory=memory)
    trainer = Trainer(engine, model.objective(train_cfg.loss), ctx)
    trainer.fit(trainer.resume(resume))
    outcome: list[Any] = [trainer.best, trainer.last_validation]
    distributed.broadcast_from_rank0(outcome)  # rank 0 scores validation
    best, last_validation = outcome
    result = RunResult(best, last_validation, chosen, trainable, engine.device, trainer.finished, cfg)
    engine.close()
    return result


def load_trained(model, ckpt_dir: Path, tag: str, lora: LoraConfig):
    """`model` (as built for training, before LoRA) with the weights of checkpoint `tag`; LoRA
    adapters, when the run had them, merged into the backbone: a plain model for a bundle."""
    if lora.enabled:
        apply_lora(model, lora)
    model.load_state_dict(consolidated_state_dict(ckpt_dir, tag), strict=True)
    return merge_lora(model) if lora.enabled else model


def move_aside(run_dir: Path, task: str) -> None:
    """--resume none: an earlier run in run_dir goes to <run_dir>.replaced-<time>, nothing is deleted
    (refused while another process writes there)."""
    if run_dir.is_dir() and any(run_dir.iterdir()):  # a file there is refused by the writer lock
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        with writer_lock(run_dir, task):
            run_dir.rename(aside)
        print(f"moved the earlier run in {run_dir} to {aside}", file=sys.stderr)
