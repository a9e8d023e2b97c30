"""`medsapiens pretrain {run,export,universal}`."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="multi-dataset pretraining, bundle export, universal checkpoints",
        description="Pretrain on shards. Multi-rank runs start with the DeepSpeed launcher "
        "(`deepspeed --num_gpus N -m pretrain --config FILE` or `medsapiens launch pretrain`); "
        "`medsapiens pretrain run` trains in this one process.")
    sub = parser.add_subparsers(dest="pretrain_command", required=True, metavar="ACTION")

    run = sub.add_parser("run", help="train in this process (CPU or one GPU)",
                         description="Same options as `python -m pretrain`.")
    run.add_argument("args", nargs=argparse.REMAINDER, help="--config FILE [--resume MODE] [KEY=VALUE ...]")
    run.set_defaults(func=_run)

    export = sub.add_parser(
        "export", help="write a bundle (model.safetensors + config.json) from a run",
        description="Reads the run's newest complete checkpoint as weights only: a checkpoint file that "
        "names anything else is refused. Share the bundle, not the run directory.")
    export.add_argument("run_dir", help="the run directory (train.run_dir)")
    export.add_argument("--out", required=True, help="bundle directory to write")
    export.add_argument("--tag", help="checkpoint tag, e.g. step_00001000 (default: the latest complete one)")
    export.set_defaults(func=_export)

    universal = sub.add_parser(
        "universal", help="convert a checkpoint for resuming at another world size",
        description="Runs DeepSpeed's ds_to_universal on a checkpoint of RUN_DIR and marks it as "
        "`latest_universal`; then resume with `--resume universal` on any number of ranks.")
    universal.add_argument("run_dir")
    universal.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    universal.set_defaults(func=_universal)


def _run(args) -> int:
    from pretrain.__main__ import main

    return main(args.args)


def _export(args) -> int:
    from medsapiens.checkpoints import CheckpointError
    from pretrain.export import export

    try:
        print(f"bundle written to {export(args.run_dir, args.out, args.tag)}")
    except CheckpointError as exc:
        raise SystemExit(f"medsapiens pretrain export: error: {exc}") from None
    return 0


def _universal(args) -> int:
    from medsapiens.checkpoints import CheckpointError, checkpoint_dir, make_universal

    try:
        tag = make_universal(checkpoint_dir(args.run_dir), args.tag)
    except CheckpointError as exc:
        raise SystemExit(f"medsapiens pretrain universal: error: {exc}") from None
    print(f"universal checkpoint {tag} written; resume with --resume universal")
    return 0
