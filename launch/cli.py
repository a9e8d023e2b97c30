"""The `medsapiens` command. Each stage registers its own subcommands; this root only assembles them.

The root lives in `launch/` (the top of the dependency graph) so that the shared core
`medsapiens/` never imports a stage. Registration imports no torch: `--help` stays fast.
"""
from __future__ import annotations

import argparse
import sys

import finetune.cli
import launch.demo
import launch.launcher
import medsapiens.cli
import pretrain.cli
import shards.cli
from medsapiens.errors import exit_code, user_line, user_message

STAGES = (shards.cli, medsapiens.cli, pretrain.cli, finetune.cli, launch.launcher, launch.demo)


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
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # noqa: BLE001 - a user's mistake gets one line; anything else its traceback
        if user_message(exc) is None:
            raise
        print(user_line(exc), file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
