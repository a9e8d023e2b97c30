"""finetune's typed flags reach the config with their type, not re-read as YAML."""
from __future__ import annotations

from medsapiens import config as configlib
from medsapiens.finetune.cli import finetune_overrides
from medsapiens.finetune.config import FinetuneConfig
from medsapiens.launch.cli import build_parser


def config_of(*argv: str) -> FinetuneConfig:
    args = build_parser().parse_args(["finetune", *argv])
    return configlib.load(FinetuneConfig, None, finetune_overrides(args))


def test_string_flags_stay_strings_and_numbers_numbers():
    cfg = config_of("--dataset", "no", "--shards", "s3://bucket/a: b", "--bundle", "1e3", "--steps", "7",
                    "--shots", "5", "--epochs", "2.5", "--batch-size", "3")
    assert cfg.dataset == "no" and cfg.data.shards == "s3://bucket/a: b" and cfg.bundle == "1e3"
    assert cfg.train.max_steps == 7 and cfg.shots == 5 and cfg.train.epochs == 2.5 and cfg.data.micro_batch == 3
