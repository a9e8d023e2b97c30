"""The `medsapiens` command. Each stage registers its own subcommands; this root only assembles them.

The root lives in `launch/` (the top of the dependency graph) so that the shared core
`medsapiens/` never imports a stage. Registration imports no torch: `--help` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from medsapiens import cli as model_cli
from medsapiens.errors import run_command
from medsapiens.evaluate import cli as evaluate_cli
from medsapiens.finetune import cli as finetune_cli
from medsapiens.io.processes import exit_process
from medsapiens.launch import demo, launcher
from medsapiens.pretrain import cli as pretrain_cli
from medsapiens.shards import cli as shards_cli

STAGES = (shards_cli, model_cli, pretrain_cli, finetune_cli, evaluate_cli, launcher, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsapiens",
        description="Anatomical landmark detection with Sapiens ViTs: build shards, pretrain with "
        "DeepSpeed, fine-tune, evaluate and predict.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        stage.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting KEY=VALUE overrides at the first option; take the later ones too.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:
        command_parser(parser, argv if argv is not None else sys.argv[1:]).error(
            f"unrecognized arguments: {' '.join(extra)}")
    return run_command(args.func, args)


def command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)command's own parser that `argv` names (`finetune`, `launch pretrain`), whose usage an error
    prints: the top-level usage says nothing of the flags the command takes."""
    for action in parser._actions:  # argparse keeps its subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for n, token in enumerate(argv):
                if token in action.choices:
                    return command_parser(action.choices[token], argv[n + 1:])
    return parser


def command() -> NoReturn:
    """The installed `medsapiens` command (setup.cfg's console script)."""
    exit_process(main())


if __name__ == "__main__":
    command()
