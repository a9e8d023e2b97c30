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
from medsapiens.model.weights import not_a_file
from medsapiens.pretrain.config import PretrainConfig
from medsapiens.training.run import (
    RunPlan,
    check_ranks_read_alike,
    check_settings,
    move_aside,
    train,
    validated_on,
    weights_digest,
)


def selected_datasets(manifest: Manifest, requested: list[str]) -> list[str]:
    unknown = sorted(set(requested) - set(manifest.datasets))
    if unknown:
        raise ManifestError(
            f"config names dataset(s) {unknown} that the manifest at {manifest.location} does not have; "
            f"it has: {', '.join(sorted(manifest.datasets))}"
        )
    return list(requested) or sorted(manifest.datasets)


def read_inputs(cfg: PretrainConfig) -> tuple[Manifest, list[str]]:
    """The manifest and the datasets to train, the starting weights and the val split checked: on every rank, before
    DeepSpeed starts (a minute, and more on many ranks), as fine-tuning reads its own."""
    if not cfg.data.shards:
        raise ManifestError("data.shards is not set: give the shard directory or s3:// prefix")
    checkpoint = cfg.model.checkpoint
    if checkpoint is not None and (found := not_a_file(checkpoint)):
        raise InputError(f"model.checkpoint {checkpoint!r}: {found}; give a Sapiens checkpoint file (.pth or "
                         ".safetensors), or null to start from random weights")
    manifest = load_manifest(cfg.data.shards)
    datasets = selected_datasets(manifest, cfg.data.datasets)
    validated_on(manifest, datasets, cfg.data.val_split)
    return manifest, datasets


def check_shards_reachable(manifest: Manifest, datasets: list[str]) -> None:
    for shard in (s for s in manifest.shards if s.dataset in datasets):
        url = manifest.url_of(shard)
        if not storage.exists(url):
            raise ManifestError(f"shard {url} listed in {manifest.location} is unreachable")


def run(cfg: PretrainConfig, resume: str = "auto") -> dict:
    check_settings(cfg)  # on every rank, before the process group (whose timeout is a setting)
    manifest, dataset_ids = read_inputs(cfg)
    with distributed_job(cfg.train.dist_timeout_s):
        check_ranks_read_alike(cfg, manifest)
        if resume == "none":
            distributed.decide_on_rank0(lambda: move_aside(Path(cfg.run_dir), "training run"))
        return train_in(cfg, resume, manifest, dataset_ids)


def train_in(cfg: PretrainConfig, resume: str, manifest: Manifest, dataset_ids: list[str]) -> dict:
    with distributed.held_by_rank0(writer_lock(Path(cfg.run_dir), "training run")):
        distributed.check_shared_folder(Path(cfg.run_dir), "run_dir")  # the ranks' checkpoint files come together there
        distributed.decide_on_rank0(lambda: check_shards_reachable(manifest, dataset_ids))  # one rank's requests
        torch.manual_seed(cfg.train.seed)
        model = cfg.model.build({d: manifest.landmark_set(d).num_landmarks for d in dataset_ids})
        plan = RunPlan("pretrain", cfg, manifest, dataset_ids, model, cfg.model,
                       start_digest=weights_digest(cfg.model.checkpoint))
        result = train(plan, resume)
        if distributed.rank() == 0 and result.finished:
            print(f"next: medsapiens pretrain export {cfg.run_dir} --out BUNDLE_DIR", file=sys.stderr)
        return result.last_validation
