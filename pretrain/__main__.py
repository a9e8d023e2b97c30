"""Entry point run by the DeepSpeed launcher on every rank: `deepspeed ... -m medsapiens.pretrain --config FILE.yaml [key=value ...]`.

Without the launcher, `python -m medsapiens.pretrain ...` trains in one process (CPU or one GPU).
"""
from __future__ import annotations

import argparse
import sys

from medsapiens import config as configlib
from medsapiens.errors import exit_code, user_line, user_message
from medsapiens.pretrain.cli import add_run_arguments
from medsapiens.pretrain.config import PretrainConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medsapiens.pretrain",
        description="Multi-dataset pretraining of the Sapiens ViT with the shared multi-head landmark decoder.",
        epilog="Overrides are dotted config keys, e.g. train.max_steps=2000 data.micro_batch=4 optim.lr=1e-4.",
    )
    add_run_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return start(build_parser().parse_args(argv))


def start(args) -> int:
    try:
        cfg = configlib.load(PretrainConfig, args.config, args.overrides)
        from medsapiens.pretrain.train import run

        run(cfg, args.resume)
    except Exception as exc:  # noqa: BLE001 - one line on every rank for bad input, a bug keeps its traceback
        if user_message(exc) is None:
            raise
        print(user_line(exc), file=sys.stderr)
        return exit_code(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
