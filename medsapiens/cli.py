"""`medsapiens model ...`: the core's own subcommands."""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("model", help="inspect backbones and convert Sapiens checkpoints")
    parser.add_subparsers(dest="model_command", required=True, metavar="ACTION")
