"""Fine-tuning one dataset: start from a bundle, a raw Sapiens checkpoint or scratch; full or LoRA;
on all or K training images; the best checkpoint on the val split becomes the output bundle, which
is then evaluated on the held-out test split(s). Several shot seeds run one after another."""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from medsapiens import config as configlib
from medsapiens import distributed
from medsapiens.data.pipeline import DataConfig, is_test_split
from medsapiens.distributed import distributed_job
from medsapiens.errors import InputError
from medsapiens.evaluate.evaluate import (
    EvalOptions,
    calibrate_model,
    evaluate_model,
    split_parts,
    summary_line,
)
from medsapiens.evaluation import conformal
from medsapiens.finetune.config import INIT_SOURCES, RESUME_MODES, RUNS_ROOT, FinetuneConfig
from medsapiens.finetune.subset import few_shot_manifest
from medsapiens.io.locks import writer_lock
from medsapiens.io.manifest import Manifest, ManifestError, check_scorable
from medsapiens.io.manifest import load as load_manifest
from medsapiens.io.registry import LandmarkSet
from medsapiens.io.shard_tar import file_digest
from medsapiens.model import bundle as bundlelib
from medsapiens.model.weights import not_a_file
from medsapiens.training.checkpoints import checkpoint_dir, has_checkpoint, latest_tag, tag_step, tags
from medsapiens.training.engine import resolve_precision
from medsapiens.training.run import (
    RunPlan,
    check_ranks_read_alike,
    check_settings,
    load_trained,
    move_aside,
    saved_config,
    sha256_shown,
    train,
    training_settings_digest,
    validated_on,
    weights_digest,
)

SUMMARY = "summary.json"


MIXTURE_KEYS = ("datasets", "mixing", "temperature", "weights")  # what pretraining draws its batches from


def check_config(cfg: FinetuneConfig) -> None:
    if cfg.init not in INIT_SOURCES:
        raise InputError(f"init must be one of {INIT_SOURCES}, got {cfg.init!r}")
    if cfg.resume not in RESUME_MODES:
        raise InputError(f"resume must be one of {RESUME_MODES}, got {cfg.resume!r}")
    defaults = DataConfig()
    mixture = [f"data.{key}" for key in MIXTURE_KEYS if getattr(cfg.data, key) != getattr(defaults, key)]
    if mixture:
        raise InputError(f"{', '.join(mixture)}: pretraining's mixture of datasets, which fine-tuning does not read: "
                         "it trains the one dataset given (--dataset, the key dataset=ID); leave them out")
    if not cfg.dataset:
        raise InputError("no dataset given (the key dataset=ID; `medsapiens finetune` also takes --dataset ID)")
    if cfg.init == "bundle" and not cfg.bundle:
        raise InputError("init 'bundle' needs a bundle (the key bundle=DIR; `medsapiens finetune` also takes "
                         "--bundle DIR)")
    if cfg.init == "sapiens" and not cfg.model.checkpoint:
        raise InputError("init 'sapiens' needs a Sapiens checkpoint (the key model.checkpoint=FILE; `medsapiens "
                         "finetune` also takes --checkpoint FILE)")
    if cfg.shots < 0 or cfg.shot_seed < 0 or any(seed < 0 for seed in cfg.seeds):
        raise InputError(f"shots, shot_seed and seeds (--shots, --seed, --seeds) must not be negative (got shots "
                         f"{cfg.shots}, shot_seed {cfg.shot_seed}, seeds {cfg.seeds})")
    for seed in (cfg.shot_seed, *cfg.seeds):
        configlib.a_seed("shot_seed and seeds (--seed, --seeds)", seed)
    repeated = sorted({seed for seed in cfg.seeds if cfg.seeds.count(seed) > 1})
    if repeated:
        raise InputError(f"seeds (--seeds) lists seed(s) {repeated} more than once: each seed is one run")
    given = (("shot_seed (--seed)", cfg.shot_seed), ("train.seed", cfg.train.seed))
    replaced = [f"{key} {value}" for key, value in given if cfg.seeds and value]
    if replaced:
        raise InputError(f"{' and '.join(replaced)} with seeds (--seeds): each seed of the list is both, for its "
                         "run; give one or the other")
    if cfg.shots and cfg.train.seed not in (0, cfg.shot_seed):
        raise InputError(f"train.seed {cfg.train.seed} in a few-shot run: it trains with its shot seed (shot_seed, "
                         f"--seed: {cfg.shot_seed}), as each of seeds does; give that seed only")
    if not cfg.shots and cfg.shot_seed != cfg.train.seed and cfg.shot_seed:
        raise InputError(f"shot_seed {cfg.shot_seed} without shots: it draws a few-shot run's images (--shots K), and "
                         f"this run trains on the whole split with train.seed {cfg.train.seed}; give train.seed="
                         f"{cfg.shot_seed} as well to train with it (`medsapiens finetune --seed {cfg.shot_seed}` sets "
                         "both), or leave shot_seed out")
    if cfg.data.micro_batch < 1:  # before check_settings, to name the flag fine-tuning users give
        raise InputError(f"data.micro_batch (--batch-size) must be at least 1, got {cfg.data.micro_batch}")
    if cfg.calibration_coverage:
        conformal.check_coverage(cfg.calibration_coverage, "calibration_coverage")
    check_settings(cfg)
    if cfg.train.val_every != cfg.train.checkpoint_every:
        raise InputError("fine-tuning keeps the best validated checkpoint: train.val_every must equal "
                         f"train.checkpoint_every (got {cfg.train.val_every} and {cfg.train.checkpoint_every})")


START_WEIGHTS = {"bundle": "the bundle's weights", "sapiens": "the Sapiens checkpoint", "scratch": "random weights"}

# With init `bundle`: grad_checkpointing is the user's choice; checkpoint (the raw Sapiens weights of
# init `sapiens`, which shared experiment configs name) is not read, and the start line says so.
BUNDLE_FREE_MODEL_KEYS = ("grad_checkpointing", "checkpoint")


def check_bundle_model(cfg: FinetuneConfig, given: set[str]) -> None:
    """With init `bundle`, the bundle's model trains: a model key the user gave (dotted, in `given`)
    with another value than the bundle's is refused by name (BUNDLE_FREE_MODEL_KEYS aside)."""
    if cfg.init != "bundle" or not cfg.bundle:
        return
    bundle_model = configlib.to_dict(bundlelib.read_config(cfg.bundle).model)
    mine = configlib.to_dict(cfg.model)
    contradicting = [f"model.{k}={mine[k]!r} (the bundle's: {bundle_model.get(k)!r})" for k in sorted(mine)
                     if f"model.{k}" in given and k not in BUNDLE_FREE_MODEL_KEYS and mine[k] != bundle_model.get(k)]
    if contradicting:
        raise InputError(f"{', '.join(contradicting)}: fine-tuning a bundle trains the bundle's model; set these "
                         "keys to the bundle's values or leave them out (of the config file and the overrides), or "
                         "start from --init sapiens or scratch to choose the model")


def check_inputs(cfg: FinetuneConfig) -> tuple[Manifest, dict[str, str]]:
    """The shards, the dataset in them and the starting weights, read before DeepSpeed starts (minutes on
    many ranks): the shards' manifest, and the bundle's config by its sha256 (the model it builds)."""
    manifest = load_manifest(cfg.data.shards)
    training_manifest_check(manifest, cfg)
    if cfg.init == "bundle":
        bundlelib.read_config(cfg.bundle)
        bundlelib.weights_file(cfg.bundle)
        check_bundle_outside(cfg.bundle, cfg.run_dir)
        return manifest, {"bundle config": sha256_shown(file_digest(Path(cfg.bundle) / bundlelib.CONFIG)[0])}
    if cfg.init == "sapiens" and (found := not_a_file(cfg.model.checkpoint)):
        raise InputError(f"model.checkpoint (--checkpoint) {cfg.model.checkpoint}: {found}, where init 'sapiens' "
                         "needs a Sapiens checkpoint file (.pth or .safetensors)")
    return manifest, {}


def check_bundle_outside(bundle: str, run_dir: str) -> None:
    """The run writes its bundle to RUN_DIR/bundle (--resume none moves RUN_DIR aside): the bundle it
    starts from must lie elsewhere, or the export replaces it."""
    if run_dir and Path(run_dir).resolve() in (Path(bundle).resolve(), *Path(bundle).resolve().parents):
        raise InputError(f"--bundle {bundle} lies in --run-dir {run_dir}, where the run writes its own bundle: it "
                         "would be replaced; give another --run-dir")


def training_manifest_check(manifest: Manifest, cfg: FinetuneConfig) -> None:
    manifest.landmark_set(cfg.dataset)  # names the dataset in the error if it is missing
    available = manifest.datasets[cfg.dataset].splits.get(cfg.data.train_split, 0)
    if cfg.shots > available:
        raise InputError(f"--shots {cfg.shots} asks for more images than {cfg.dataset!r} has in its "
                         f"{cfg.data.train_split!r} split ({available})")
    validated_on(manifest, [cfg.dataset], cfg.data.val_split)
    evaluation_splits(manifest, cfg.dataset, cfg.eval_split)  # fail now, not after training


def initial_model(cfg: FinetuneConfig, landmark_set: LandmarkSet):
    """(model with exactly one head, for cfg.dataset; its ModelConfig; where it came from)."""
    dataset, k = cfg.dataset, landmark_set.num_landmarks
    if cfg.init == "bundle":
        model, bundle = bundlelib.load(cfg.bundle)
        reused = dataset in bundle.heads
        if reused and not cfg.reinit_head:
            check_reusable_head(cfg.bundle, bundle, dataset, landmark_set)
        for other in [d for d in model.dataset_ids if d != dataset or cfg.reinit_head]:
            model.drop_head(other)
        if dataset not in model.dataset_ids:  # a new dataset, or its head re-initialised (reinit_head)
            model.add_head(dataset, k)
        model_cfg = replace(bundle.model, grad_checkpointing=cfg.model.grad_checkpointing)
        model.backbone.set_grad_checkpointing(model_cfg.grad_checkpointing)
        origin = {"init": "bundle", "bundle": str(Path(cfg.bundle).resolve()),
                  "bundle_sha256": weights_digest(str(Path(cfg.bundle) / bundlelib.WEIGHTS)),
                  "reused_head": reused and not cfg.reinit_head,
                  "bundle_provenance": {k_: bundle.provenance.get(k_) for k_ in ("stage", "steps", "manifest")}}
    else:
        model_cfg = cfg.model if cfg.init == "sapiens" else replace(cfg.model, checkpoint=None)
        model = model_cfg.build({dataset: k})
        origin = {"init": cfg.init, "checkpoint": model_cfg.checkpoint,
                  "checkpoint_sha256": weights_digest(model_cfg.checkpoint)}
    return model, replace(model_cfg, checkpoint=None), origin


def check_reusable_head(bundle_dir: str, bundle: bundlelib.Bundle, dataset: str, landmark_set: LandmarkSet) -> None:
    """The bundle's head for `dataset` predicts the shards' landmarks, in their order (else it would start
    training from another dataset's landmarks under these names)."""
    theirs = bundle.landmark_sets[dataset]
    if theirs.names == landmark_set.names:
        return
    if theirs.num_landmarks != landmark_set.num_landmarks:
        what = f"has a {theirs.num_landmarks}-landmark head for {dataset!r}, the shards have {landmark_set.num_landmarks}"
    else:
        k = next(k for k, (a, b) in enumerate(zip(theirs.names, landmark_set.names, strict=True)) if a != b)
        what = (f"has a head for {dataset!r} on other landmarks than the shards' (landmark {k}: {theirs.names[k]!r} "
                f"in the bundle, {landmark_set.names[k]!r} in the shards)")
    raise ManifestError(f"bundle {bundle_dir} {what}: start that head afresh with --reinit-head (reinit_head=true), "
                        "or fine-tune on the shards it was trained for")


def evaluation_splits(manifest: Manifest, dataset: str, requested: str) -> list[str]:
    splits = manifest.datasets[dataset].splits
    if requested != "auto":
        parts = split_parts(requested, "--eval-split")
        chosen = [requested] if all(splits.get(part) for part in parts) else []
    else:
        chosen = ["test"] if splits.get("test") else sorted(s for s in splits if is_test_split(s) and splits[s])
    if not chosen:
        raise ManifestError(f"{manifest.location}: dataset {dataset!r} has no {requested!r} split to evaluate "
                            f"(splits: {', '.join(sorted(splits))}); choose one with --eval-split")
    for split in chosen:
        for part in split_parts(split):
            check_scorable(manifest, dataset, part)
    return chosen


def training_manifest(cfg: FinetuneConfig, manifest: Manifest, run_dir: Path) -> Manifest:
    """The shards to train on: the given ones (`manifest`, checked at start), or (K-shot) a subset of them
    written by rank 0."""
    if not cfg.shots:
        return manifest
    subset_dir = run_dir / "subset"
    if cfg.resume == "auto":
        distributed.decide_on_rank0(lambda: check_same_subset(run_dir, cfg, manifest))
    distributed.decide_on_rank0(lambda: few_shot_manifest(manifest, cfg.dataset, cfg.shots, cfg.shot_seed, subset_dir,
                                                          cfg.data.train_split))
    return load_manifest(subset_dir)


def check_same_subset(run_dir: Path, cfg: FinetuneConfig, manifest: Manifest) -> None:
    """A few-shot run that resumes a checkpoint keeps the images it drew: another draw (or other shards) is
    refused before the run's subset is rewritten, as `check_same_run` refuses other settings. Run on rank 0."""
    if not has_checkpoint(checkpoint_dir(run_dir)):
        return
    subset_dir = run_dir / "subset"
    drawn = load_manifest(subset_dir).build.get("few_shot", {}) if (subset_dir / "subset.json").is_file() else {}
    before = (drawn.get("shots"), drawn.get("seed"), drawn.get("from_sha256"))
    if drawn and before != (cfg.shots, cfg.shot_seed, manifest.digest):
        raise InputError(f"{subset_dir.parent} holds a run on {before[0]} images drawn with seed {before[1]} from shards "
                         f"sha256 {str(before[2])[:12]}; this run asks for {cfg.shots} with seed {cfg.shot_seed} from "
                         f"{manifest.digest[:12]}: rerun with its settings to resume it, or start afresh in another run "
                         "directory (or with --resume none)")


def exported_tag(run_dir: Path, best: dict | None) -> str:
    """The checkpoint the bundle is made of: the best on val, else the last."""
    return best["tag"] if best else latest_tag(checkpoint_dir(run_dir))


def export_best(cfg: FinetuneConfig, run_dir: Path, tag: str, model_cfg, landmark_set, origin: dict,
                validation, selection: dict, data: dict) -> Path:
    model = load_trained(model_cfg.build({cfg.dataset: landmark_set.num_landmarks}), checkpoint_dir(run_dir), tag,
                         cfg.lora)
    provenance = {"stage": "finetune", "dataset": cfg.dataset, **origin, "lora": cfg.lora.enabled,
                  "shots": cfg.shots, "shot_seed": cfg.shot_seed, "checkpoint": tag,
                  "steps": tag_step(tag), "selection": selection, "validation": validation,
                  **data, "config": configlib.to_dict(cfg)}
    bundle = bundlelib.Bundle(model_cfg, {cfg.dataset: landmark_set}, bundlelib.CodecSettings.of(cfg.data), provenance)
    return bundlelib.save(run_dir / "bundle", model, bundle)


@dataclass
class FinetuneResult:
    """One fine-tuning run: its directory, its bundle (the checkpoint selected on val), the report of
    each evaluated split."""

    run_dir: str
    bundle: str
    seed: int
    best: dict | None
    trainable_parameters: int
    reports: dict[str, dict]

    @property
    def report(self) -> dict:
        return next(iter(self.reports.values()))

    def lines(self) -> list[str]:
        return ([f"{split}: {summary_line(report)}" for split, report in self.reports.items()]
                + [f"bundle: {self.bundle}"]
                + [f"report ({split}): {self.run_dir}/eval/{split}/report.md" for split in self.reports])


@dataclass
class SeedsResult:
    """One run per seed: the summary written to summary.json (mean, std and values over the seeds)."""

    run_dir: str
    summary_file: str
    summary: dict

    def lines(self) -> list[str]:
        s = self.summary
        lines = []
        for split, numbers in s["splits"].items():
            sdr = ", ".join(f"SDR@{r} {v['mean']:.2f} +- {v['std']:.2f}%" for r, v in numbers["sdr"].items())
            lines.append(f"{split}: {len(s['seeds'])} seeds: MRE {numbers['mre']['mean']:.3f} +- "
                         f"{numbers['mre']['std']:.3f} {s['unit']} (mean +- population std over seeds), {sdr}")
        values = {split: numbers["mre"]["values"] for split, numbers in s["splits"].items()}
        return [*lines, json.dumps({"seeds": s["seeds"], "mre": values}),
                f"summary: {self.summary_file}; each seed's bundle and reports under {self.run_dir}/seed_<n>"]


@dataclass
class StoppedShort:
    """A run that train.stop_after ended before its schedule's last step: nothing exported or evaluated yet
    (the same on every rank)."""

    run_dir: str
    seeds_waiting: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        waiting = f"; seed(s) {', '.join(map(str, self.seeds_waiting))} not started" if self.seeds_waiting else ""
        return [f"{self.run_dir}: stopped before the schedule's end (train.stop_after), no bundle or evaluation "
                f"yet{waiting}; rerun the command with train.stop_after raised or dropped to go on"]


def run_one(cfg: FinetuneConfig, shards: Manifest) -> FinetuneResult | StoppedShort | None:
    """Train on `shards` (the manifest every rank read alike), export the best checkpoint, evaluate. Rank 0
    returns the result, other ranks None; a run stopped short by train.stop_after is StoppedShort on every rank."""
    run_dir = Path(cfg.run_dir)
    if distributed.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    manifest = training_manifest(cfg, shards, run_dir)
    landmark_set = manifest.landmark_set(cfg.dataset)
    torch.manual_seed(cfg.train.seed)
    model, model_cfg, origin = initial_model(cfg, landmark_set)
    if distributed.rank() == 0:
        print(f"fine-tuning {cfg.dataset} from {cfg.init}{' with LoRA' if cfg.lora.enabled else ''}"
              f"{f', {cfg.shots}-shot (seed {cfg.shot_seed})' if cfg.shots else ''}", file=sys.stderr)
        starts = (("model.checkpoint", cfg.model.checkpoint, "sapiens"), ("bundle", cfg.bundle, "bundle"))
        unread = [f"{key} ({value})" for key, value, read_by in starts if value and cfg.init != read_by]
        if unread:
            print(f"note: {' and '.join(unread)} not read: the run starts from {START_WEIGHTS[cfg.init]}",
                  file=sys.stderr)
        batch = cfg.data.micro_batch * distributed.world_size()
        if cfg.shots and cfg.shots < batch:
            print(f"note: {cfg.shots} training image(s) in a batch of {batch} (micro-batch {cfg.data.micro_batch} x "
                  f"{distributed.world_size()} rank(s)): each batch repeats them, differently augmented", file=sys.stderr)
    if cfg.init == "bundle":  # the bundle's model trains: config.yaml records it
        cfg = replace(cfg, model=model_cfg)
    evaluated = evaluation_splits(manifest, cfg.dataset, cfg.eval_split)
    start = origin.get("bundle_sha256") or origin.get("checkpoint_sha256")
    plan = RunPlan("finetune", cfg, manifest, [cfg.dataset], model, model_cfg, track_best=True,
                   info={"origin": origin, "evaluation_splits": evaluated}, start_digest=start)
    result = train(plan)
    del model, plan
    if not result.finished:
        return StoppedShort(str(run_dir))
    best = result.best
    validation = best and best["validation"]
    data = {"manifest": trained_on(cfg, manifest), "evaluation_splits": evaluated}
    distributed.decide_on_rank0(lambda: export_best(result.config, run_dir, exported_tag(run_dir, best), model_cfg,
                                                    landmark_set, origin, validation, result.selection, data))
    model, bundle = bundlelib.load(run_dir / "bundle", result.device)
    calibrate_run(cfg, model, bundle, manifest, result.device)
    options = EvalOptions(cfg.flip_test, cfg.data.micro_batch, result.device, cfg.eval_overlays)
    reports = {split: evaluate_model(model, bundle, manifest, cfg.dataset, split, run_dir / "eval" / split, options)
               for split in evaluated}
    if distributed.rank() != 0:
        return None
    return FinetuneResult(str(run_dir), str(run_dir / "bundle"), cfg.shot_seed, best, result.trainable_parameters,
                          reports)


def trained_on(cfg: FinetuneConfig, manifest: Manifest) -> dict:
    """The shards a bundle was fine-tuned on, as its provenance names them: the manifest given (location
    and sha256) and, for a few-shot run, the keys of the images drawn from it."""
    few_shot = manifest.build.get("few_shot")
    if not few_shot:
        return {"location": cfg.data.shards, "sha256": manifest.digest}
    return {"location": cfg.data.shards, "sha256": few_shot["from_sha256"], "few_shot_keys": few_shot["keys"]}


def calibrate_run(cfg: FinetuneConfig, model, bundle: bundlelib.Bundle, manifest: Manifest, device) -> None:
    """Conformal radii of the selected checkpoint on the val split, stored in RUN_DIR/bundle."""
    if not cfg.calibration_coverage:
        return
    try:
        calibration = calibrate_model(model, bundle, manifest, cfg.dataset, cfg.data.val_split,
                                      cfg.calibration_coverage, EvalOptions(cfg.flip_test, cfg.data.micro_batch, device))
    except conformal.TooFewToCalibrate as exc:
        if distributed.rank() == 0:
            print(f"calibration skipped: {exc}", file=sys.stderr)
        return
    bundle.calibration = {cfg.dataset: calibration}
    distributed.decide_on_rank0(lambda: bundlelib.write_config(Path(cfg.run_dir) / "bundle", bundle))


SEED_STD = "population (ddof 0) over the seeds"


def seed_summary(results: list[FinetuneResult]) -> dict:
    """Per evaluated split (ISBI 2015 has two), the mean and std over seeds of MRE, both stds and each SDR
    radius, with the per-seed values."""
    def stats(values):
        return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": [float(v) for v in values]}

    def split_summary(reports: list[dict]) -> dict:
        summary = {name: stats([r[name] for r in reports]) for name in ("mre", "mre_std_images", "mre_std_landmarks")}
        return {**summary, "sdr": {radius: stats([r["sdr"][radius] for r in reports]) for radius in reports[0]["sdr"]}}

    splits = {split: split_summary([r.reports[split] for r in results]) for split in results[0].reports}
    return {"seeds": [r.seed for r in results], "unit": results[0].report["unit"], "std": SEED_STD, "splits": splits,
            "runs": [{"seed": r.seed, "run_dir": r.run_dir, "bundle": r.bundle} for r in results]}


def default_run_dir(cfg: FinetuneConfig) -> str:
    """runs/finetune/<dataset>-<init>[-lora][-<K>shot]-<digest of what trains>: the same command (rerun after a
    stop signal or train.stop_after, or requeued) finds its run again and resumes it; other settings, shards
    or starting weights (by content, not path), another number of ranks or precision get their own."""
    parts = [cfg.dataset, cfg.init, *(["lora"] if cfg.lora.enabled else []), *([f"{cfg.shots}shot"] if cfg.shots else [])]
    identity = {"data.shards": load_manifest(cfg.data.shards).digest, "ranks": distributed.world_size(),
                "train.precision": resolve_precision(cfg.train.precision),
                "bundle": weights_digest(str(Path(cfg.bundle) / bundlelib.WEIGHTS)) if cfg.init == "bundle" else None,
                "model.checkpoint": weights_digest(cfg.model.checkpoint) if cfg.init == "sapiens" else None}
    return str(Path(RUNS_ROOT) / f"{'-'.join(parts)}-{training_settings_digest(cfg, identity)}")


def settled_run_dir(cfg: FinetuneConfig) -> FinetuneConfig:
    """The config with its run directory chosen by rank 0 (the default one when none is given), an
    earlier run there moved aside for --resume none."""
    cfg = replace(cfg, run_dir=distributed.computed_on_rank0(lambda: cfg.run_dir or default_run_dir(cfg)))
    if cfg.resume == "none":
        distributed.decide_on_rank0(lambda: move_aside(Path(cfg.run_dir), "fine-tuning"))
    if distributed.rank() == 0:
        print(f"run directory: {cfg.run_dir}", file=sys.stderr)
    return cfg


def with_shot_seed(cfg: FinetuneConfig, seed: int) -> FinetuneConfig:
    """A few-shot run of `seed`: the images drawn and the training (init, order, augmentation) both follow
    it, whether it came as --seed, shot_seed or one of seeds."""
    return replace(cfg, shot_seed=seed, train=replace(cfg.train, seed=seed))


def trained_with_seed_zero(cfg: FinetuneConfig) -> bool:
    """A few-shot run in cfg.run_dir that started from the key shot_seed with train.seed 0, before a few-shot
    run trained with its shot seed: it resumes with the seed it trained with."""
    if cfg.resume != "auto" or not tags(checkpoint_dir(Path(cfg.run_dir))):  # as check_same_run
        return False
    before = saved_config(Path(cfg.run_dir))
    if before is None:
        return False
    trained = before.get("train")
    return before.get("shot_seed") == cfg.shot_seed != 0 and isinstance(trained, dict) and trained.get("seed") == 0


def run(cfg: FinetuneConfig) -> FinetuneResult | SeedsResult | StoppedShort | None:
    """Fine-tune (once, or once per seed); rank 0 returns the result, other ranks None. A seed stopped
    short by train.stop_after ends the job there: the seeds after it wait for the rerun."""
    check_config(cfg)
    manifest, bundle = check_inputs(cfg)
    with distributed_job(cfg.train.dist_timeout_s), contextlib.ExitStack() as held:
        check_ranks_read_alike(cfg, manifest, **bundle)
        cfg = settled_run_dir(cfg)
        held.enter_context(distributed.held_by_rank0(writer_lock(Path(cfg.run_dir), "fine-tuning")))
        distributed.check_shared_folder(Path(cfg.run_dir), "run_dir")  # checkpoints, the few-shot draw, the bundle
        if not cfg.seeds:
            few_shot = cfg.shots and not distributed.computed_on_rank0(lambda: trained_with_seed_zero(cfg))
            result = run_one(with_shot_seed(cfg, cfg.shot_seed) if few_shot else cfg, manifest)
            return result if distributed.rank() == 0 else None
        results = []
        for n, seed in enumerate(cfg.seeds):
            seed_dir = str(Path(cfg.run_dir) / f"seed_{seed}")
            result = run_one(replace(with_shot_seed(cfg, seed), seeds=[], run_dir=seed_dir), manifest)
            if isinstance(result, StoppedShort):
                return replace(result, seeds_waiting=cfg.seeds[n + 1:]) if distributed.rank() == 0 else None
            results.append(result)
        if distributed.rank() != 0:
            return None
        summary = seed_summary([r for r in results if r is not None])  # rank 0 has every result
        (Path(cfg.run_dir) / SUMMARY).write_text(json.dumps(summary, indent=2))
        return SeedsResult(cfg.run_dir, str(Path(cfg.run_dir) / SUMMARY), summary)
