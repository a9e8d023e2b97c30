"""`medsapiens pretrain export`: a DeepSpeed checkpoint of a run -> a bundle (docs/ARCHITECTURE.md, contract 3)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from medsapiens import config as configlib
from medsapiens.io.registry import LandmarkSet
from medsapiens.model import bundle as bundlelib
from medsapiens.pretrain.config import PretrainConfig
from medsapiens.training.checkpoints import checkpoint_dir, latest_tag, tag_step
from medsapiens.training.run import load_trained
from medsapiens.training.trainer import RESOLVED_CONFIG, RUN_INFO, validation_at


def export(run_dir: str | Path, out: str | Path, tag: str | None = None) -> Path:
    run_dir = Path(run_dir)
    cfg = configlib.load(PretrainConfig, run_dir / RESOLVED_CONFIG)
    info = json.loads((run_dir / RUN_INFO).read_text())
    ckpt_dir = checkpoint_dir(run_dir)
    tag = tag or latest_tag(ckpt_dir)
    sets = {d: LandmarkSet.from_dict(info["landmark_sets"][d]) for d in info["dataset_ids"]}
    model_cfg = replace(cfg.model, checkpoint=None, grad_checkpointing=False)
    model = load_trained(model_cfg.build({d: s.num_landmarks for d, s in sets.items()}), ckpt_dir, tag, cfg.lora)
    step = tag_step(tag)
    provenance = {
        "stage": "pretrain",
        "run_dir": str(run_dir.resolve()),
        "checkpoint": tag,
        "steps": step,
        "lora": cfg.lora.enabled,
        "selection": info.get("selection"),
        "manifest": info["manifest"],
        "validation": validation_at(run_dir, step),
        "config": configlib.to_dict(cfg),
    }
    return bundlelib.save(out, model, bundlelib.Bundle(model_cfg, sets, bundlelib.CodecSettings.of(cfg.data), provenance))
