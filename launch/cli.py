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
        message = user_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


# Raised by the library for input it cannot use (a missing file, a bad config value, a manifest or
# bundle that does not check out): the message names the file or key.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, PermissionError, ValueError)
CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError"}  # botocore's, matched by name: no import


def user_error(exc: Exception) -> str | None:
    if type(exc).__name__ in CREDENTIAL_ERRORS:
        return (f"{exc}: s3:// needs AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "or ~/.aws/credentials)")
    return str(exc) if isinstance(exc, USER_ERRORS) else None


if __name__ == "__main__":
    sys.exit(main())
