"""Entry point run by the DeepSpeed launcher on every rank: `deepspeed ... --module medsapiens.finetune --config FILE.yaml [KEY=VALUE ...]`.

Without the launcher, `python -m medsapiens.finetune ...` (or `medsapiens finetune ...`) runs in one process.
"""
from __future__ import annotations

import argparse
import json
import sys

from medsapiens import config as configlib
from medsapiens.errors import exit_code, user_line, user_message


def load_config(path: str | None, overrides: list[str]):
    from medsapiens.finetune.config import FinetuneConfig
    from medsapiens.finetune.train import check_bundle_model

    try:
        cfg = configlib.load(FinetuneConfig, path, overrides)
        check_bundle_model(cfg, set(configlib.flatten(configlib.load_data(path, overrides))))
        return cfg
    except Exception as exc:  # noqa: BLE001 - a user error is one line, a bug keeps its traceback
        if user_message(exc) is None:
            raise
        refuse(exc)


def report_result(result: dict | None) -> int:
    """Print the outcome on the rank that has it (rank 0)."""
    if result is None:
        return 0
    from medsapiens.evaluate.evaluate import summary_line

    if "report" in result:
        for split, report in result["reports"].items():
            print(f"{split}: {summary_line(report)}")
        print(f"bundle: {result['bundle']}")
        for split in result["reports"]:
            print(f"report ({split}): {result['run_dir']}/eval/{split}/report.md")
    else:
        sdr = ", ".join(f"SDR@{r} {s['mean']:.2f} +- {s['std']:.2f}%" for r, s in result["sdr"].items())
        print(f"{len(result['seeds'])} seeds: MRE {result['mre']['mean']:.3f} +- {result['mre']['std']:.3f} "
              f"{result['unit']} (mean +- std over seeds), {sdr}")
        print(json.dumps({"seeds": result["seeds"], "mre": result["mre"]["values"]}))
        print(f"summary: {result['summary']}; each seed's bundle and reports under {result['run_dir']}/seed_<n>")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medsapiens.finetune", description="Fine-tune on one dataset.",
                                     epilog="Overrides are dotted config keys, e.g. dataset=leg shots=5 seeds=[0,1,2].")
    parser.add_argument("--config", help="fine-tuning YAML")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    return run_config(load_config(args.config, args.overrides))


def run_config(cfg) -> int:
    from medsapiens.finetune.train import run

    try:
        return report_result(run(cfg))
    except Exception as exc:  # noqa: BLE001 - bad input gets one line, a bug its traceback
        if user_message(exc) is None:
            raise
        refuse(exc)


def refuse(exc: Exception):
    """One line and its exit status (2 for input it cannot use), as every command does."""
    print(user_line(exc), file=sys.stderr)
    sys.exit(exit_code(exc))


if __name__ == "__main__":
    sys.exit(main())
