"""`medsapiens demo`: the whole pipeline on the built-in phantoms, and the measurement that matters.

phantoms in native layouts -> shards -> 2-rank DeepSpeed pretraining of sapiens_tiny (or
sapiens2_tiny) on three sets
-> bundle -> few-shot fine-tuning on the fourth set from three starts (the pretrained bundle, the
same backbone without the multi-dataset pretraining, scratch) over several seeds -> evaluation on
the held-out test split -> the table in the layout of the paper's, also as results.json.

Every stage skips work a previous run already finished, so an interrupted demo continues.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from medsapiens.cli import positive_int
from medsapiens.errors import EXIT_USER_ERROR, UserError
from medsapiens.launch.launcher import check_gpu_count

EXPERIMENTS = Path(__file__).resolve().parent / "experiments"
BACKBONE_SEED = 1000
DEMO_ARCHS = ("sapiens_tiny", "sapiens2_tiny")
STARTS = (
    ("bundle", "MedSapiens: multi-dataset pretrained bundle"),
    ("sapiens", "Same backbone, no multi-dataset pretraining"),
    ("scratch", "Scratch (random init)"),
)


@dataclass
class DemoPlan:
    out: Path = Path("runs/demo")
    arch: str = "sapiens_tiny"
    held_out: str = "leg"
    pretrain_sets: tuple[str, ...] = ("head", "hand", "chest")
    phantoms: int = 120
    seed: int = 0
    ranks: int = 2
    shots: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_steps: int | None = None  # None: the experiment config's train.max_steps
    finetune_steps: int | None = None

    @property
    def settings(self) -> dict:
        """What decides the demo's results: a rerun into the same folder must ask for the same (step counts
        as they run: a count not given is the experiment config's)."""
        return with_steps_resolved({"arch": self.arch, "held_out": self.held_out, "ranks": self.ranks,
                                    "pretrain_steps": self.pretrain_steps, "finetune_steps": self.finetune_steps})

    @property
    def sets(self) -> tuple[str, ...]:
        return (*self.pretrain_sets, self.held_out)


STEP_CONFIGS = {"pretrain_steps": "demo.yaml", "finetune_steps": "demo_finetune.yaml"}


def with_steps_resolved(settings: dict) -> dict:
    """Step counts left unset (None, also in a marker written before they were resolved) as the stage runs
    them: its experiment config's train.max_steps."""
    import yaml  # here: the CLI that imports this module also runs in the torch-free predict install, without yaml

    return {key: yaml.safe_load((EXPERIMENTS / STEP_CONFIGS[key]).read_text())["train"]["max_steps"]
            if key in STEP_CONFIGS and value is None else value for key, value in settings.items()}


def medsapiens(*args: str) -> list[str]:
    return [sys.executable, "-m", "medsapiens.launch.cli", *args]


def step(number: int, total: int, text: str) -> None:
    print(f"\n[{number}/{total}] {text}", flush=True)


class StageFailed(UserError):
    """A stage of the demo failed (its own error is printed above); the demo exits with its status."""

    def __init__(self, cmd: list[str], status: int):
        super().__init__(f"demo stopped: `{' '.join(cmd)}` exited with {status}")
        self.exit_code = status if status > 0 else EXIT_USER_ERROR


def run(cmd: list[str]) -> None:
    """Run a stage as the user would from the shell, its progress shown; stop the demo if it fails."""
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise StageFailed(cmd, result.returncode)


def claim_out(plan: DemoPlan) -> None:
    """An output folder holds one demo: its finished stages are skipped on a rerun, so a rerun there
    with other settings (arch, held-out set, ranks, steps) would mix two runs into one table."""
    check_demo_folder(plan.out)
    marker, settings = plan.out / DEMO_MARKER, plan.settings
    if marker.exists():
        made_with = with_steps_resolved(json.loads(marker.read_text()))
    elif (plan.out / LEGACY_MARKER).exists():
        made_with = {"arch": "sapiens_tiny"}  # a demo from before the marker held its settings
    else:
        made_with = settings
    differing = [f"{key} {made_with[key]} (now {settings[key]})" for key in settings
                 if key in made_with and made_with[key] != settings[key]]
    if differing:
        raise UserError(f"{plan.out} holds a demo made with other settings: {', '.join(differing)}; "
                        "pass --fresh to start over there, or another --out")
    plan.out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings))


DEMO_MARKER = "demo.json"
LEGACY_MARKER = "sapiens_tiny_init.safetensors"  # what a demo folder held before it had a marker


def check_demo_folder(out: Path) -> None:
    """The demo writes (and `--fresh` deletes) only a folder of its own: absent, empty, or a demo's."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; the demo needs a folder")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in (DEMO_MARKER, LEGACY_MARKER)):
        raise UserError(f"--out {out} holds files and no demo ({DEMO_MARKER}); the demo writes, and --fresh deletes, "
                        "only a folder of its own: choose another --out")


def steps_override(steps: int | None) -> list[str]:
    return [] if steps is None else [f"train.max_steps={steps}"]


def make_phantoms(plan: DemoPlan) -> Path:
    raw = plan.out / "raw"
    done = raw / ".complete"
    if not done.exists():
        run(medsapiens("shards", "phantoms", "--out", str(raw), "--n", str(plan.phantoms), "--seed", str(plan.seed),
                       "--sets", ",".join(plan.sets)))
        done.write_text(json.dumps({"n": plan.phantoms, "seed": plan.seed, "sets": plan.sets}))
    return raw


def make_shards(plan: DemoPlan, raw: Path) -> Path:
    shards = plan.out / "shards"
    sources = [a for d in plan.sets for a in ("--source", f"{d}={raw / d}")]
    # 120 hand phantoms are too few for GU2Net's 550/59/rest split: a seeded one keeps a test split
    run(medsapiens("shards", "build", *sources, "--out", str(shards), "--max-side", "256", "--shard-size", "64",
                   "--workers", "2", "--opt", "hand.split=seeded"))
    return shards


def make_initial_backbone(plan: DemoPlan) -> Path:
    """The backbone both the pretraining and the 'no multi-dataset pretraining' start begin from.

    No small Sapiens is released, so the demo's stands in: a seeded random tiny backbone saved
    as a Sapiens checkpoint (and loaded through the same path a real one takes). Its seed is not
    one of the fine-tuning seeds, so it is not the very init a scratch run draws."""
    import torch

    from medsapiens.model import build_backbone, save_backbone

    path = plan.out / f"{plan.arch}_init.safetensors"
    if not path.exists():
        torch.manual_seed(BACKBONE_SEED + plan.seed)
        save_backbone(build_backbone(plan.arch, (128, 96)), path, "medsapiens demo: seeded random init")
    return path


def pretrain(plan: DemoPlan, shards: Path, backbone: Path) -> Path:
    run_dir = plan.out / "pretrain"
    datasets = "[" + ",".join(plan.pretrain_sets) + "]"
    run(medsapiens("launch", "pretrain", "--config", str(EXPERIMENTS / "demo.yaml"), "--gpus", str(plan.ranks),
                   f"data.shards={shards}", f"run_dir={run_dir}", f"data.datasets={datasets}",
                   f"model.checkpoint={backbone}", f"model.arch={plan.arch}", *steps_override(plan.pretrain_steps)))
    bundle = plan.out / "bundle"
    run(medsapiens("pretrain", "export", str(run_dir), "--out", str(bundle)))
    return bundle


def finetune(plan: DemoPlan, shards: Path, bundle: Path, backbone: Path, init: str) -> dict:
    run_dir = plan.out / "finetune" / init
    summary = run_dir / "summary.json"
    if not summary.exists() or "splits" not in json.loads(summary.read_text()):  # none yet, or an older format's
        start = {"bundle": ["--bundle", str(bundle)], "sapiens": ["--init", "sapiens", "--checkpoint", str(backbone)],
                 "scratch": ["--init", "scratch"]}[init]
        run(medsapiens("finetune", "--config", str(EXPERIMENTS / "demo_finetune.yaml"), *start,
                       "--shards", str(shards), "--dataset", plan.held_out, "--shots", str(plan.shots),
                       "--seeds", ",".join(map(str, plan.seeds)), "--run-dir", str(run_dir), f"model.arch={plan.arch}",
                       *steps_override(plan.finetune_steps)))
    return json.loads(summary.read_text())


def headline(summary: dict) -> tuple[str, dict]:
    """The first evaluated split of a seeds summary, and its numbers (the held-out set has one test split)."""
    return next(iter(summary["splits"].items()))


def table(plan: DemoPlan, results: dict) -> str:
    first = next(iter(results.values()))
    split, numbers = headline(first)
    unit, radii = first["unit"], list(numbers["sdr"])
    header = f"| Method ({plan.shots}-shot {plan.held_out} {split}, {len(plan.seeds)} seeds) | MRE ({unit}) | " + \
        " | ".join(f"SDR {r} {unit} (%)" for r in radii) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(radii)]
    for name, r in results.items():
        numbers = headline(r)[1]
        cells = [f"{numbers['mre']['mean']:.2f} ± {numbers['mre']['std']:.2f}"]
        cells += [f"{numbers['sdr'][k]['mean']:.1f} ± {numbers['sdr'][k]['std']:.1f}" for k in radii]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def starts_figure(plan: DemoPlan, results: dict) -> Path:
    """The cumulative error curves of the three starts in one figure: the transfer gain at a glance."""
    from medsapiens.evaluate.figures import runs_ced_figure

    first = next(iter(results.values()))
    split, numbers = headline(first)
    starts = {name: [Path(run["run_dir"]) / "eval" / split / "per_image.csv" for run in r["runs"]]
              for name, r in results.items()}
    return runs_ced_figure(starts, first["unit"], [float(k) for k in numbers["sdr"]], plan.out / "ced_starts.png",
                           f"{plan.shots}-shot {plan.held_out}, {len(plan.seeds)} seeds pooled: error CDF per start")


def run_demo(plan: DemoPlan) -> dict:
    started = time.time()
    claim_out(plan)
    total = 5 + len(STARTS)
    step(1, total, f"phantom datasets in their native layouts ({plan.phantoms} images per set)")
    raw = make_phantoms(plan)
    step(2, total, "validated WebDataset shards")
    shards = make_shards(plan, raw)
    step(3, total, f"the initial {plan.arch} backbone")
    backbone = make_initial_backbone(plan)
    step(4, total, f"pretraining on {', '.join(plan.pretrain_sets)} with {plan.ranks} DeepSpeed ranks, then export")
    bundle = pretrain(plan, shards, backbone)
    results = {}
    for number, (init, name) in enumerate(STARTS, start=5):
        step(number, total, f"{plan.shots}-shot fine-tuning on {plan.held_out} from: {name}")
        results[name] = {"init": init, **finetune(plan, shards, bundle, backbone, init)}
    step(total, total, "results on the held-out test split (mean ± population std over seeds)")
    text = table(plan, results)
    report = {"arch": plan.arch, "dataset": plan.held_out, "shots": plan.shots, "seeds": list(plan.seeds),
              "pretrained_on": list(plan.pretrain_sets), "unit": next(iter(results.values()))["unit"],
              "starts": results, "table": text, "minutes": round((time.time() - started) / 60, 2),
              "paths": {"shards": str(shards), "pretrain_run": str(plan.out / "pretrain"), "bundle": str(bundle),
                        "finetune_runs": str(plan.out / "finetune")}}
    report["paths"]["ced_figure"] = str(starts_figure(plan, results))
    (plan.out / "results.json").write_text(json.dumps(report, indent=2))
    print(text)
    print(f"\nresults.json: {plan.out / 'results.json'}\n"
          f"TensorBoard:  tensorboard --logdir {plan.out}\n"
          f"reports:      {plan.out}/finetune/<start>/seed_<n>/eval/<split>/report.md (overlays/ beside them)\n"
          f"CED curves:   {report['paths']['ced_figure']} (one curve per start, all seeds pooled)\n"
          f"contact sheet of the phantoms: medsapiens shards inspect {shards} --sheet sheet.png")
    return report


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline on built-in phantoms (CPU, 6-10 min on 2 cores)",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--out", help="output folder (default runs/demo, runs/demo_sapiens2_tiny for that arch)")
    parser.add_argument("--arch", default="sapiens_tiny", choices=DEMO_ARCHS,
                        help="the backbone: sapiens_tiny (default) or sapiens2_tiny, the Sapiens2 architecture "
                             "(about 17 min on 2 cores)")
    parser.add_argument("--fresh", action="store_true", help="delete the output folder first")
    parser.add_argument("--ranks", type=positive_int, help="DeepSpeed ranks for pretraining (default 2; on a GPU "
                        "machine one per GPU, at most 2)")
    parser.add_argument("--held-out", default="leg", choices=("head", "hand", "chest", "leg"),
                        help="the set kept out of pretraining and fine-tuned few-shot (default leg)")
    parser.add_argument("--pretrain-steps", type=positive_int, metavar="N",
                        help="pretraining steps (default 800, launch/experiments/demo.yaml)")
    parser.add_argument("--finetune-steps", type=positive_int, metavar="N",
                        help="fine-tuning steps of each run (default 120, launch/experiments/demo_finetune.yaml)")
    parser.set_defaults(func=_demo)


def default_ranks() -> int:
    """2 CPU ranks, or on a GPU machine one rank per GPU, at most 2."""
    import torch

    return min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2


def _demo(args) -> int:
    out = Path(args.out or ("runs/demo" if args.arch == "sapiens_tiny" else f"runs/demo_{args.arch}"))
    ranks = args.ranks or default_ranks()
    check_gpu_count(ranks, "--ranks", os.environ)
    if args.fresh and out.exists():
        check_demo_folder(out)
        shutil.rmtree(out)
    pretrain_sets = tuple(d for d in ("head", "hand", "chest", "leg") if d != args.held_out)
    run_demo(DemoPlan(out=out, arch=args.arch, ranks=ranks, held_out=args.held_out, pretrain_sets=pretrain_sets,
                      pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps))
    return 0
