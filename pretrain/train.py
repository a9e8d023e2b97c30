"""Pretraining: checks before the first step, the multi-head model, then the shared run assembly."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from medsapiens import distributed
from medsapiens.distributed import distributed_job
from medsapiens.errors import InputError
from medsapiens.io import storage
from medsapiens.io.locks import writer_lock
from medsapiens.io.manifest import Manifest, ManifestError
from medsapiens.io.manifest import load as load_manifest
from medsapiens.pretrain.config import PretrainConfig
from medsapiens.training.run import RunPlan, check_settings, move_aside, not_a_file, train, weights_digest


def selected_datasets(manifest: Manifest, requested: list[str]) -> list[str]:
    unknown = sorted(set(requested) - set(manifest.datasets))
    if unknown:
        raise ManifestError(
            f"config names dataset(s) {unknown} that the manifest at {manifest.location} does not have; "
            f"it has: {', '.join(sorted(manifest.datasets))}"
        )
    return list(requested) or sorted(manifest.datasets)


def preflight(cfg: PretrainConfig) -> tuple[Manifest, list[str]]:
    """What can be known wrong before the first step beyond the settings: manifest, datasets, shard
    URLs. Returns the manifest and the datasets to train."""
    if not cfg.data.shards:
        raise ManifestError("data.shards is not set: give the shard directory or s3:// prefix")
    checkpoint = cfg.model.checkpoint
    if checkpoint is not None and (found := not_a_file(checkpoint)):
        raise InputError(f"model.checkpoint {checkpoint!r}: {found}; give a Sapiens checkpoint file (.pth or "
                         ".safetensors), or null to start from random weights")
    manifest = load_manifest(cfg.data.shards)
    datasets = selected_datasets(manifest, cfg.data.datasets)
    for shard in (s for s in manifest.shards if s.dataset in datasets):
        url = manifest.url_of(shard)
        if not storage.exists(url):
            raise ManifestError(f"shard {url} listed in {manifest.location} is unreachable")
    return manifest, datasets


def run(cfg: PretrainConfig, resume: str = "auto") -> dict:
    check_settings(cfg)  # on every rank, before the process group (whose timeout is a setting)
    with distributed_job(cfg.train.dist_timeout_s):
        if resume == "none":
            distributed.decide_on_rank0(lambda: move_aside(Path(cfg.run_dir), "training run"))
        return train_in(cfg, resume)


def train_in(cfg: PretrainConfig, resume: str) -> dict:
    with distributed.held_by_rank0(writer_lock(Path(cfg.run_dir), "training run")):
        found: list = [None]
        distributed.decide_on_rank0(lambda: found.__setitem__(0, preflight(cfg)))
        distributed.broadcast_from_rank0(found)  # loaded once, on rank 0
        manifest, dataset_ids = found[0]
        torch.manual_seed(cfg.train.seed)
        model = cfg.model.build({d: manifest.landmark_set(d).num_landmarks for d in dataset_ids})
        plan = RunPlan("pretrain", cfg, manifest, dataset_ids, model, cfg.model,
                       start_digest=weights_digest(cfg.model.checkpoint))
        result = train(plan, resume)
        if distributed.rank() == 0 and result.finished:
            print(f"next: medsapiens pretrain export {cfg.run_dir} --out BUNDLE_DIR", file=sys.stderr)
        return result.last_validation
