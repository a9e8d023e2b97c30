"""`medsapiens pretrain export`: a DeepSpeed checkpoint of a run -> a bundle (docs/ARCHITECTURE.md, contract 3)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from medsapiens import config as configlib
from medsapiens.errors import InputError
from medsapiens.io.registry import LandmarkSet
from medsapiens.model import bundle as bundlelib
from medsapiens.pretrain.config import PretrainConfig
from medsapiens.training.checkpoints import checkpoint_dir, latest_tag, tag_step
from medsapiens.training.run import load_trained
from medsapiens.training.trainer import RESOLVED_CONFIG, RUN_INFO, validation_at


def export(run_dir: str | Path, out: str | Path, tag: str | None = None, force: bool = False) -> bool:
    """Write the bundle; False when `out` already held this very export (left as is, calibration included).
    Another bundle in `out` is refused unless `force`: exporting over it would lose it without a word; files
    of other kinds there are refused either way (a bundle has a folder of its own)."""
    run_dir, out = Path(run_dir), Path(out)
    info = pretraining_run_info(run_dir)
    held_files = bundlelib.check_folder(out)
    cfg = configlib.load(PretrainConfig, run_dir / RESOLVED_CONFIG)
    ckpt_dir = checkpoint_dir(run_dir)
    if tag is None:
        tag = latest_tag(ckpt_dir)
        if tag_step(tag) < cfg.train.max_steps:
            raise InputError(f"{run_dir} stopped at step {tag_step(tag)} of {cfg.train.max_steps}: rerun its command to "
                             f"finish it, or export that checkpoint on purpose with --tag {tag}")
    same_export = not force and previous_export(out, held_files, run_dir, tag)
    sets = {d: LandmarkSet.from_dict(info["landmark_sets"][d]) for d in info["dataset_ids"]}
    model_cfg = replace(cfg.model, checkpoint=None, grad_checkpointing=False)
    model = load_trained(model_cfg.build({d: s.num_landmarks for d, s in sets.items()}), ckpt_dir, tag, cfg.lora)
    if same_export:
        if bundlelib.holds_weights(out, model):
            return False
        raise InputError(f"{out} holds {tag} of this run with other weights (the run started over since?): left "
                         "untouched; pass --force to replace it, or give another --out")
    step = tag_step(tag)
    provenance = {
        "stage": "pretrain",
        "run_dir": str(run_dir.resolve()),
        "checkpoint": tag,
        "steps": step,
        "finished": step >= cfg.train.max_steps,
        "start_sha256": info.get("start_sha256"),
        "lora": cfg.lora.enabled,
        "selection": info.get("selection"),
        "manifest": info["manifest"],
        "validation": validation_at(run_dir, step),
        "config": configlib.to_dict(cfg),
    }
    bundlelib.save(out, model, bundlelib.Bundle(model_cfg, sets, bundlelib.CodecSettings.of(cfg.data), provenance))
    return True


def pretraining_run_info(run_dir: Path) -> dict:
    """The run.json of a pretraining run directory; anything else is one line."""
    if not (run_dir / RUN_INFO).is_file():
        raise InputError(f"{run_dir} is not a training run directory (no {RUN_INFO}; the run_dir of a pretraining run)")
    info = json.loads((run_dir / RUN_INFO).read_text())
    if info.get("stage") != "pretrain":
        raise InputError(f"{run_dir} is a {info.get('stage', 'unknown')} run, not a pretraining run: a fine-tuning "
                         "run exports its best checkpoint itself, to RUN_DIR/bundle, and resumes as it stopped")
    return info


def previous_export(out: Path, held_files: list[str], run_dir: Path, tag: str) -> bool:
    """False when `out` holds no bundle files (`held_files`, as check_folder found them); True when it holds a
    bundle exported from this checkpoint of this run (its weights still to be compared); anything else there is
    refused, naming what it holds."""
    if not held_files:
        return False
    try:
        held = bundlelib.read_config(out)
    except (OSError, ValueError) as exc:  # read_config's InputError is a ValueError
        raise InputError(f"{out} holds {' and '.join(held_files)}, not a readable bundle ({exc}): left untouched; "
                         "give another --out, or pass --force to overwrite them") from None
    source = held.provenance
    if (source.get("stage"), source.get("run_dir"), source.get("checkpoint")) == ("pretrain", str(run_dir.resolve()), tag):
        return True
    calibrated = f", calibrated for {', '.join(held.calibration)}" if held.calibration else ""
    stage = source.get("stage", "unknown")
    of_run = f" of {source['run_dir']}" if source.get("run_dir") else f" of a {stage} run"
    raise InputError(f"{out} already holds a bundle ({stage} checkpoint {source.get('checkpoint', '?')}{of_run}"
                     f"{calibrated}): left untouched; "
                     f"pass --force to replace it with {tag} of {run_dir}, or give another --out")
