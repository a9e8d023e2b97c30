"""Entry point run by the DeepSpeed launcher on every rank: `deepspeed ... --module medsapiens.pretrain --config FILE.yaml [key=value ...]`.

Without the launcher, `python -m medsapiens.pretrain ...` trains in one process (CPU or one GPU).
"""
from __future__ import annotations

import argparse

from medsapiens.errors import run_command
from medsapiens.io.processes import exit_process
from medsapiens.pretrain.cli import add_run_arguments, run_training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medsapiens.pretrain",
        description="Multi-dataset pretraining of the Sapiens ViT with the shared multi-head landmark decoder.",
        epilog="Overrides are dotted config keys, e.g. data.micro_batch=4 optim.lr=1e-4; a schedule counted in steps "
        "instead of the shipped configs' epochs: train.epochs=0 train.max_steps=2000.",
    )
    add_run_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(run_training, build_parser().parse_intermixed_args(argv))


if __name__ == "__main__":
    exit_process(main())
