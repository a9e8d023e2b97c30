"""`medsapiens pretrain {run,export,universal}`."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="multi-dataset pretraining, bundle export, universal checkpoints",
        description="Pretrain on shards. Multi-rank runs start with the DeepSpeed launcher "
        "(`deepspeed --num_gpus N --module medsapiens.pretrain --config FILE` or `medsapiens launch pretrain`); "
        "`medsapiens pretrain run` trains in this one process.")
    sub = parser.add_subparsers(dest="pretrain_command", required=True, metavar="ACTION")

    run = sub.add_parser("run", help="train in this process (CPU or one GPU)",
                         description="Same options as `python -m medsapiens.pretrain`.")
    add_run_arguments(run)
    run.set_defaults(func=run_training)

    export = sub.add_parser(
        "export", help="write a bundle (model.safetensors + config.json) from a run",
        description="Reads the run's newest complete checkpoint as weights only: a checkpoint file that "
        "names anything else is refused. Share the bundle, not the run directory.")
    export.add_argument("run_dir", help="the pretraining run directory (the config's run_dir)")
    export.add_argument("--out", required=True, help="bundle directory to write")
    export.add_argument("--tag", help="checkpoint tag, e.g. step_00001000 (default: the latest complete one, once the "
                        "run has finished: a run stopped short exports only with --tag)")
    export.add_argument("--force", action="store_true",
                        help="replace what --out already holds; without it, a rerun of the same export leaves the "
                        "bundle as it is (calibration included) and an --out holding anything else is refused")
    export.set_defaults(func=_export)

    universal = sub.add_parser(
        "universal", help="convert a checkpoint for resuming at another world size",
        description="Runs DeepSpeed's ds_to_universal on a checkpoint of RUN_DIR and marks it as "
        "`latest_universal`; then resume with `--resume universal` on any number of ranks.")
    universal.add_argument("run_dir", help="the pretraining run directory (the config's run_dir)")
    universal.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    universal.set_defaults(func=_universal)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `medsapiens pretrain run` and of `python -m medsapiens.pretrain` (the launcher's entry point)."""
    parser.add_argument("--config", help="experiment YAML, e.g. launch/experiments/sapiens_0.3b.yaml")
    parser.add_argument("--resume", choices=["auto", "universal", "none"], default="auto",
                        help="auto: continue from the run's last complete checkpoint if there is one (default); "
                        "universal: load the universal checkpoint made by `medsapiens pretrain universal` "
                        "(another world size; only data.micro_batch and train.grad_accum may differ from the run's "
                        "settings); none: move the run in run_dir aside (RUN_DIR.replaced-<time>) and start afresh")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def run_training(args) -> None:
    from medsapiens import config as configlib
    from medsapiens.pretrain.config import PretrainConfig
    from medsapiens.pretrain.train import run
    from medsapiens.training.run import check_settings

    run(configlib.load(PretrainConfig, args.config, args.overrides, check_settings), args.resume)  # as launch checks it


def _export(args) -> int:
    from medsapiens.pretrain.export import export

    if export(args.run_dir, args.out, args.tag, args.force):
        print(f"bundle written to {args.out}")
    else:
        print(f"{args.out} already holds this export: left as is")
    return 0


def _universal(args) -> int:
    from medsapiens.pretrain.export import pretraining_run_info
    from medsapiens.training.checkpoints import checkpoint_dir, make_universal

    pretraining_run_info(Path(args.run_dir))  # only a pretraining run resumes from a universal checkpoint
    tag = make_universal(checkpoint_dir(args.run_dir), args.tag)
    print(f"universal checkpoint {tag} written; resume with --resume universal")
    return 0
