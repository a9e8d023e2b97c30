"""Training speed of CPU ranks: each rank taking its share of torch's threads (what a rank does unless
OMP_NUM_THREADS is set) against every rank taking torch's own count, all the cores (forced here with
OMP_NUM_THREADS). The demo's pretraining (sapiens_tiny, ZeRO-2) through the real launcher on
the phantoms; runs alternate, side by side in one run.

    python bench/cpu_threads.py [--ranks 2] [--steps 150] [--runs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch

from medsapiens.distributed import free_port
from medsapiens.shards.build import BuildOptions, build
from medsapiens.shards.phantoms import write_phantoms
from medsapiens.shards.plan import SourceSpec

DEMO_CONFIG = resources.files("medsapiens.launch") / "experiments" / "demo.yaml"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def samples_per_s(shards: Path, run_dir: Path, ranks: int, steps: int, threads: dict) -> float:
    """Samples per second of all ranks, over the logged intervals after the first (which holds the start)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | threads
    subprocess.run([str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module",
                    "medsapiens.pretrain", "--config", str(DEMO_CONFIG), f"data.shards={shards}", f"run_dir={run_dir}",
                    f"train.max_steps={steps}", f"train.val_every={steps}", f"train.checkpoint_every={steps}"],
                   check=True, capture_output=True, env=env)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [row["perf/samples_per_s_all_ranks"] for row in rows if "perf/samples_per_s_all_ranks" in row]
    return statistics.mean(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks on this machine")
    parser.add_argument("--steps", type=int, default=150, help="training steps per run")
    parser.add_argument("--runs", type=int, default=2, help="runs of each setting, alternating")
    args = parser.parse_args()
    cores = torch.get_num_threads()  # torch's own count for a process here, as a rank starts with it
    settings = {"a share of the cores per rank": {}, "all cores per rank": {"OMP_NUM_THREADS": str(cores)}}
    rates: dict[str, list[float]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        roots = write_phantoms(Path(tmp, "raw"), n=24, seed=0, sets=("head", "hand", "chest"))
        build([SourceSpec(name, str(root), options={"split": "seeded"} if name == "hand" else {})
               for name, root in roots.items()],
              BuildOptions(out=str(Path(tmp, "shards")), max_side=128, progress=False))
        for run in range(args.runs):
            for name, threads in settings.items():
                run_dir = Path(tmp, f"run_{run}_{len(rates[name])}_{bool(threads)}")
                rates[name].append(samples_per_s(Path(tmp, "shards"), run_dir, args.ranks, args.steps, threads))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{args.ranks} CPU ranks on {cores} cores, {args.steps} steps of the demo's pretraining:")
    for name, values in rates.items():
        print(f"  {name:>29}: median {medians[name]:.1f} samples/s ({', '.join(f'{v:.1f}' for v in values)})")
    print(f"a share of the cores per rank trains {medians['a share of the cores per rank'] / medians['all cores per rank']:.2f}x "
          "as fast as all cores per rank")


if __name__ == "__main__":
    main()
