"""`medsapiens finetune`."""
from __future__ import annotations

import argparse
import json

from medsapiens.errors import InputError

FLAG_KEYS = {  # flag destination -> config key
    "shards": "data.shards", "dataset": "dataset", "bundle": "bundle", "init": "init", "checkpoint": "model.checkpoint",
    "arch": "model.arch", "shots": "shots", "seed": "shot_seed", "steps": "train.max_steps", "run_dir": "run_dir",
    "eval_split": "eval_split", "epochs": "train.epochs", "batch_size": "data.micro_batch", "resume": "resume",
}


def register(subparsers) -> None:
    ft = subparsers.add_parser(
        "finetune", help="adapt a bundle (or a Sapiens checkpoint, or scratch) to one dataset",
        description="Fine-tune on one dataset of a shard set: full or LoRA, on all or K training images. "
        "The best checkpoint on the val split (never a test split) becomes RUN_DIR/bundle, evaluated with flip "
        "test on the test split(s) into RUN_DIR/eval/<split>. The default schedule is MedSapiens' published one: "
        "210 epochs, lr x0.1 at epochs 170 and 200, 500 warm-up steps (a fifth of a run under 2500 steps), the "
        "steps derived from the training images and the global batch (printed at start); "
        "launch/experiments/medsapiens_0.3b_finetune.yaml "
        "holds the full published settings. With --seeds, one run per seed under RUN_DIR/seed_N and, per evaluated "
        "split, the mean +- std over the seeds in RUN_DIR/summary.json. Multi-rank: `medsapiens launch finetune "
        "--config FILE`.",
        epilog="Examples:\n  medsapiens finetune --bundle runs/pretrain/bundle --shards SHARDS --dataset leg\n"
        "  medsapiens finetune --bundle B --shards S --dataset leg --lora --shots 5 --seeds 0,1,2\n"
        "  medsapiens finetune --init sapiens --checkpoint sapiens_0.3b_epoch_1600_clean.pth --arch sapiens_0.3b "
        "--lora --shards S --dataset head", formatter_class=argparse.RawDescriptionHelpFormatter)
    ft.add_argument("--config", help="YAML with any FinetuneConfig keys (flags and KEY=VALUE override it)")
    ft.add_argument("--shards", help="shard directory or s3:// prefix")
    ft.add_argument("--dataset", help="dataset id to fine-tune on")
    ft.add_argument("--bundle", help="pretrained bundle directory (init 'bundle', the default)")
    ft.add_argument("--init", choices=["bundle", "sapiens", "scratch"], help="where the weights start")
    ft.add_argument("--checkpoint", help="raw Sapiens checkpoint for --init sapiens")
    ft.add_argument("--arch", help="architecture for --init sapiens/scratch (default sapiens_0.3b, at "
                    "model.img_size 1024x768; `medsapiens model info --arch A` gives its size and memory)")
    ft.add_argument("--lora", action="store_true", help="train only LoRA adapters and the decoder")
    ft.add_argument("--reinit-head", action="store_true",
                    help="start this dataset's head afresh even if the bundle has one (as MedSapiens' fine-tuning does)")
    ft.add_argument("--shots", type=int, help="train on K images of the train split (few-shot; default: every image)")
    ft.add_argument("--seed", type=int, help="which K images, and the training seed (the key shot_seed)")
    ft.add_argument("--seeds", type=seed_list, help="comma-separated seeds, run one after another, e.g. 0,1,2")
    ft.add_argument("--epochs", type=float, help="training epochs (default 210, the published schedule)")
    ft.add_argument("--steps", type=int, help="training steps instead of epochs")
    ft.add_argument("--batch-size", type=int, help="micro-batch per rank (data.micro_batch)")
    ft.add_argument("--no-flip-test", action="store_true", help="evaluate without averaging the mirrored image")
    ft.add_argument("--eval-split", help="split evaluated at the end (default: test, else every test* split, each reported; "
                    "test1+test2 scores both as one)")
    ft.add_argument("--run-dir", help="output directory (default: runs/finetune/<dataset>-<init>[-lora][-<K>shot]-"
                    "<digest of what trains>, which the same command finds again); a run there with the same "
                    "settings is resumed from its newest complete checkpoint, read as weights only (a file naming "
                    "anything else is refused); one with other settings is refused, naming them")
    ft.add_argument("--resume", choices=["auto", "none"],
                    help="auto (default): continue the run in --run-dir if there is one; none: move it aside "
                    "(RUN_DIR.replaced-<time>) and start afresh")
    ft.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any config key, e.g. optim.lr=1e-4")
    ft.set_defaults(func=_finetune)


def seed_list(text: str) -> list[int]:
    """An argparse type: "0,1,2" -> [0, 1, 2]."""
    seeds = [seed.strip() for seed in text.split(",")]
    if not all(seed.isdecimal() for seed in seeds):
        raise argparse.ArgumentTypeError(f"expected whole numbers of at least 0 between commas, e.g. 0,1,2, got {text!r}")
    return [int(seed) for seed in seeds]


def finetune_overrides(args) -> list[str]:
    """The flags as KEY=VALUE overrides, then the user's own; one of those setting a key a flag sets is
    refused (it would silently replace the flag's value)."""
    # JSON is YAML: a flag's value comes back with its type (`--dataset no` stays the string "no")
    flagged = [(f"--{k.replace('_', '-')}", f"{FLAG_KEYS[k]}={json.dumps(v)}")
               for k, v in vars(args).items() if k in FLAG_KEYS and v is not None]
    if args.lora:
        flagged.append(("--lora", "lora.enabled=true"))
    if args.reinit_head:
        flagged.append(("--reinit-head", "reinit_head=true"))
    if args.no_flip_test:
        flagged.append(("--no-flip-test", "flip_test=false"))
    if args.steps is not None and args.epochs is not None:
        raise InputError("give --steps or --epochs, not both")
    for flag, value in (("--steps", args.steps), ("--epochs", args.epochs)):
        if value is not None and value <= 0:
            raise InputError(f"{flag} must be above 0, got {value:g}")
    if args.shots is not None and args.shots <= 0:  # the key's 0, every image, is what leaving the flag out gives
        raise InputError(f"--shots must be above 0, got {args.shots}: leave it out to train on every image")
    if args.seed is not None and args.seeds:
        raise InputError("give --seed or --seeds, not both: each seed of --seeds is the seed of its run")
    starts = (("--bundle", args.bundle, "bundle"), ("--checkpoint", args.checkpoint, "sapiens"))
    unread = [flag for flag, given, read_by in starts if given and args.init not in (None, read_by)]
    if unread:
        raise InputError(f"--init {args.init} does not read {' or '.join(unread)}: leave it out, or choose the --init "
                         "that starts from it (--bundle: bundle, --checkpoint: sapiens)")
    if args.steps is not None:
        flagged.append(("--steps", "train.epochs=0"))  # --steps replaces the epoch schedule
    if args.epochs is not None:
        flagged.append(("--epochs", "train.max_steps=0"))
    if args.seed is not None:
        flagged.append(("--seed", f"train.seed={args.seed}"))  # as each of --seeds does
    if args.seeds:
        flagged.append(("--seeds", f"seeds={json.dumps(args.seeds)}"))
    check_flags_kept(flagged, args.overrides)
    return [override for _, override in flagged] + args.overrides


def check_flags_kept(flagged: list[tuple[str, str]], overrides: list[str]) -> None:
    from medsapiens import config as configlib

    for item in overrides:
        key, value = configlib.parse_override(item)
        for flag, set_by_flag in flagged:
            flag_key = set_by_flag.partition("=")[0]
            if any(configlib.overlapping(flag_key, leaf) for leaf in configlib.keys_set(key, value)):
                raise InputError(f"{flag} sets {flag_key}, and so does the override {key}=...: give one of them")


def _finetune(args) -> int:
    return run_finetune(args.config, finetune_overrides(args))


def run_finetune(config_path: str | None, overrides: list[str]) -> int:
    from medsapiens import config as configlib
    from medsapiens.finetune.config import FinetuneConfig
    from medsapiens.finetune.train import check_bundle_model, check_config, run

    cfg = configlib.load(FinetuneConfig, config_path, overrides, check_config)  # its refusals before the generic ones
    check_bundle_model(cfg, set(configlib.flatten(configlib.load_data(FinetuneConfig, config_path, overrides))))
    return report_result(run(cfg))


def report_result(result) -> int:
    """Print the outcome on the rank that has it (rank 0)."""
    for line in result.lines() if result is not None else []:
        print(line)
    return 0
