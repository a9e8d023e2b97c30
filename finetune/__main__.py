"""Entry point run by the DeepSpeed launcher on every rank: `deepspeed ... --module medsapiens.finetune --config FILE.yaml [KEY=VALUE ...]`.

Without the launcher, `python -m medsapiens.finetune ...` (or `medsapiens finetune ...`) runs in one process.
"""
from __future__ import annotations

import argparse

from medsapiens.errors import run_command
from medsapiens.finetune.cli import run_finetune
from medsapiens.io.processes import exit_process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medsapiens.finetune", description="Fine-tune on one dataset.",
                                     epilog="Overrides are dotted config keys, e.g. dataset=leg shots=5 seeds=[0,1,2].")
    parser.add_argument("--config", help="fine-tuning YAML")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_intermixed_args(argv)
    return run_command(run_finetune, args.config, args.overrides)


if __name__ == "__main__":
    exit_process(main())
