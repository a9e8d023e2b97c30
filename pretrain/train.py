"""Pretraining: checks before the first step, model and engine set-up, then the shared training loop."""
from __future__ import annotations

from pathlib import Path

import torch

from medsapiens import config as configlib
from medsapiens import distributed, storage
from medsapiens.engine import Engine, init_distributed, shutdown
from medsapiens.manifest import Manifest, ManifestError, load as load_manifest
from medsapiens.model import forward_flops, param_groups
from medsapiens.trainer import RunContext, Trainer, write_run_files
from pretrain.config import PretrainConfig


def selected_datasets(manifest: Manifest, requested: list[str]) -> list[str]:
    unknown = sorted(set(requested) - set(manifest.datasets))
    if unknown:
        raise ManifestError(
            f"config names dataset(s) {unknown} that the manifest at {manifest.location} does not have; "
            f"it has: {', '.join(sorted(manifest.datasets))}"
        )
    return list(requested) or sorted(manifest.datasets)


def preflight(cfg: PretrainConfig) -> None:
    """Everything that can be known wrong before the first step: settings, manifest, datasets, shard URLs."""
    cfg.train.check()
    if not cfg.data.shards:
        raise ManifestError("data.shards is not set: give the shard directory or s3:// prefix")
    manifest = load_manifest(cfg.data.shards)
    datasets = selected_datasets(manifest, cfg.data.datasets)
    for shard in (s for s in manifest.shards if s.dataset in datasets):
        url = manifest.url_of(shard)
        if not storage.exists(url):
            raise ManifestError(f"shard {url} listed in {manifest.location} is unreachable")



def run(cfg: PretrainConfig, resume: str = "auto") -> dict:
    init_distributed(cfg.train.dist_timeout_s)
    try:
        distributed.decide_on_rank0(lambda: preflight(cfg))
        manifest = load_manifest(cfg.data.shards)
        dataset_ids = selected_datasets(manifest, cfg.data.datasets)
        heads = {d: manifest.landmark_set(d).num_landmarks for d in dataset_ids}
        torch.manual_seed(cfg.train.seed)
        model = cfg.model.build(heads)
        engine = Engine(model, param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay),
                        cfg.train, cfg.optim, cfg.data.micro_batch, universal=resume == "universal")
        run_dir = Path(cfg.run_dir)
        if distributed.rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_run_files(run_dir, cfg, "pretrain", manifest, dataset_ids)
        ctx = RunContext(run_dir, manifest, dataset_ids, cfg.model.input_size, cfg.data, cfg.train, configlib.digest(cfg),
                         forward_flops(cfg.model.arch, cfg.model.img_size, cfg.model.trunk_width,
                                       sum(heads.values())).total)
        trainer = Trainer(engine, model.loss, ctx)
        return trainer.fit(trainer.resume(resume))
    finally:
        shutdown()
