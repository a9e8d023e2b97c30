"""Entry point run by the DeepSpeed launcher on every rank: `deepspeed ... -m pretrain --config FILE.yaml [key=value ...]`.

Without the launcher, `python -m pretrain ...` trains in one process (CPU or one GPU).
"""
from __future__ import annotations

import argparse
import sys

from medsapiens import config as configlib
from pretrain.config import PretrainConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain",
        description="Multi-dataset pretraining of the Sapiens ViT with the shared multi-head landmark decoder.",
        epilog="Overrides are dotted config keys, e.g. train.max_steps=2000 data.micro_batch=4 optim.lr=1e-4.",
    )
    parser.add_argument("--config", help="experiment YAML, e.g. launch/experiments/sapiens_0.3b.yaml")
    parser.add_argument("--resume", choices=["auto", "universal", "none"], default="auto",
                        help="auto: continue from the run's last complete checkpoint if there is one (default); "
                        "universal: load the universal checkpoint made by `medsapiens pretrain universal` "
                        "(another world size); none: start over")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = configlib.load(PretrainConfig, args.config, args.overrides)
    except configlib.ConfigError as exc:
        parser.error(str(exc))
    from pretrain.train import run

    run(cfg, args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
