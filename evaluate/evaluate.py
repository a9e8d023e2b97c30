"""`medsapiens evaluate`: a bundle on a shard split, or any tool's predictions against ground truth,
scored by the dataset's protocol in original-image pixels."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medsapiens import distributed
from medsapiens.data.pipeline import is_test_split
from medsapiens.errors import InputError
from medsapiens.evaluate.report import (
    OVERLAYS,
    build_report,
    check_wrist_landmarks,
    remove_earlier_report,
    write_report,
)
from medsapiens.evaluation import conformal
from medsapiens.evaluation.inference import PredictSettings, predict_split
from medsapiens.evaluation.metrics import Protocol
from medsapiens.evaluation.visualize import draw_landmarks
from medsapiens.io import registry
from medsapiens.io.manifest import Manifest, ManifestError, check_scorable
from medsapiens.io.manifest import load as load_manifest
from medsapiens.io.record import safe_name
from medsapiens.io.registry import LandmarkSet
from medsapiens.model import bundle as bundlelib


def check_split(manifest: Manifest, dataset: str, split: str, bundle: bundlelib.Bundle) -> None:
    theirs = manifest.landmark_set(dataset)  # first: it names the datasets the shards hold when this one is not there
    splits = manifest.datasets[dataset].splits
    if not splits.get(split):
        raise ManifestError(f"{manifest.location}: dataset {dataset!r} has no {split!r} samples "
                            f"(splits: {', '.join(f'{s} {n}' for s, n in sorted(splits.items())) or 'none'})")
    check_scorable(manifest, dataset, split)
    if dataset not in bundle.heads:
        raise ManifestError(f"the bundle has no head for {dataset!r} (heads: {', '.join(bundle.heads)})")
    ours = bundle.landmark_sets[dataset]
    if ours.num_landmarks != theirs.num_landmarks:
        raise ManifestError(f"the bundle's {dataset!r} head predicts {ours.num_landmarks} landmarks, "
                            f"the shards have {theirs.num_landmarks}")
    if (ours.names, ours.unit) != (theirs.names, theirs.unit):
        raise ManifestError(f"the bundle's {dataset!r} head and the shards' {dataset!r} differ in "
                            f"{describe_difference(ours, theirs)}: not the same landmarks")


def describe_difference(ours: LandmarkSet, theirs: LandmarkSet) -> str:
    """Where two landmark sets of the same size differ: the unit, else the first differing name."""
    if ours.unit != theirs.unit:
        return f"unit: bundle {ours.unit!r}, shards {theirs.unit!r}"
    k = next(k for k, (a, b) in enumerate(zip(ours.names, theirs.names, strict=True)) if a != b)
    return f"landmark {k}'s name: bundle {ours.names[k]!r}, shards {theirs.names[k]!r}"


@dataclass(frozen=True)
class EvalOptions:
    """How a bundle is run for evaluation and calibration (flip test, batch, device) and, for
    evaluation, the protocol's choices and how many overlays to draw."""

    flip_test: bool = True
    batch_size: int = 8
    device: str = "cpu"
    overlays: int = 0
    wrist_landmarks: tuple[int, int] | None = None  # hand protocol: the two wrist landmarks
    convention: str = "<"  # SDR counts error < r, or <= r

    def settings(self, model, bundle: bundlelib.Bundle) -> PredictSettings:
        return PredictSettings.of_bundle(model, bundle, self.device, self.batch_size, self.flip_test)


def evaluate_model(model, bundle: bundlelib.Bundle, manifest: Manifest, dataset: str, split: str, out_dir,
                   options: EvalOptions = EvalOptions()) -> dict | None:
    """Predict a split on every rank; rank 0 writes the report files (an earlier report there replaced, its
    overlays included) and returns the report. `split` may join splits with '+' (ISBI 2015's two test sets
    as one, `test1+test2`), scored as one."""
    parts = split_parts(split)
    for part in parts:
        check_split(manifest, dataset, part, bundle)
    landmark_set = manifest.landmark_set(dataset)
    check_wrist_landmarks(options.wrist_landmarks, landmark_set)
    preds = None
    for part in parts:
        got = predict_split(model, manifest, dataset, model.dataset_ids.index(dataset), part,
                            options.settings(model, bundle), panels=options.overlays)
        if preds is None:
            preds = got
        elif got is not None:
            preds.extend(got)
            preds.panels = preds.panels[:options.overlays]
    reports: list[dict] = []

    def score() -> None:
        assert preds is not None  # rank 0 holds every rank's predictions
        protocol = Protocol(landmark_set, options.wrist_landmarks, options.convention)
        errors, mask = preds.errors(protocol)
        flip = " with flip test" if options.flip_test and landmark_set.can_flip else ""
        report = build_report(errors, mask, preds.ids, protocol, dataset, f"{split} split of {manifest.location}{flip}",
                              preds.unit_per_pixel(protocol), preds.unscalable(protocol))
        report.update(evaluated_on=split, flip_test=bool(flip), selected_on=selection_of(bundle))
        if annotations := annotations_read(manifest, dataset):
            report["annotations"] = annotations
        if rejected := sum(manifest.split_count(dataset, "rejected_by_split", part) for part in parts):
            report["rejected_at_build"] = rejected
        calibration = registry.record_for(bundle.calibration, dataset, bool(flip))
        if calibration and not protocol.scales_like_the_default():  # the radii scale by the default pair
            report["coverage_not_measured"] = (f"the radii were calibrated on errors scaled by the default wrist "
                                               f"landmarks {Protocol(landmark_set).wrist_pair}, this evaluation's by "
                                               f"{protocol.wrist_pair}")
        elif calibration:
            report["coverage"] = conformal.coverage_report(errors, mask, calibration, landmark_set.names, split)
        remove_earlier_report(Path(out_dir))  # a fine-tuning rerun's; the evaluate command asks first
        write_report(report, np.where(mask, errors, np.nan), preds.ids, landmark_set.names, out_dir)
        write_overlays(preds.panels, Path(out_dir) / OVERLAYS)
        reports.append(report)

    distributed.decide_on_rank0(score)  # a bad image stops every rank, not rank 0 alone
    return reports[0] if reports else None


def split_parts(split: str, flag: str = "--split") -> list[str]:
    parts = split.split("+")
    if "" in parts or len(set(parts)) < len(parts):
        raise InputError(f"{flag} {split}: name a split, or distinct splits joined by '+' (test1+test2)")
    return parts


def annotations_read(manifest: Manifest, dataset: str) -> dict:
    """The reader and options the dataset's shards were built with: which ground truth (ISBI's senior,
    junior or mean of both) and which test images a report's numbers are on."""
    source = manifest.datasets[dataset].source
    return {"reader": source["reader"], "options": source.get("options", {})} if "reader" in source else {}


def refuse_unfit_split(split: str, bundle: bundlelib.Bundle) -> None:
    """Calibration needs images the model did not train on and the reported coverage is not measured on."""
    if is_test_split(split):
        raise InputError(f"calibration split {split!r} is a test split: the coverage reported there would no longer "
                         "be held out. Calibrate on 'val' (shards build carves one: --opt ID.val_fraction=F)")
    if split == training_split(bundle):
        raise InputError(f"calibration split {split!r} is the split this bundle trained on: its errors there are "
                         "smaller than on new images, so the radii would cover less than promised. Calibrate on 'val'")


def training_split(bundle: bundlelib.Bundle) -> str:
    """The split the bundle's last stage trained on, as its provenance records it (else `train`)."""
    config = bundle.provenance.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    split = data.get("train_split") if isinstance(data, dict) else None
    return split if isinstance(split, str) else "train"


def calibrate_model(model, bundle: bundlelib.Bundle, manifest: Manifest, dataset: str, split: str = "val",
                    coverage: float = 0.9, options: EvalOptions = EvalOptions()) -> dict | None:
    """Split conformal radii per landmark on `split`, with flip test as evaluation and predict use it by
    default; every rank predicts, rank 0 returns the calibration record (which names the shards it was
    calibrated on: their location and the sha256 of their manifest). The split is never a test split
    or the one the bundle trained on: `calibrate` checks (refuse_unfit_split), as fine-tuning's
    DataConfig.check does, before any model is loaded."""
    conformal.check_coverage(coverage)
    check_split(manifest, dataset, split, bundle)
    shortfall = calibration_shortfall(manifest, dataset, split, coverage)
    if shortfall:
        raise conformal.TooFewToCalibrate(shortfall)
    landmark_set = manifest.landmark_set(dataset)
    preds = predict_split(model, manifest, dataset, model.dataset_ids.index(dataset), split,
                          options.settings(model, bundle))
    record = None
    refused: list[tuple[bool, str] | None] = [None]  # (too few images?, why)
    if preds is not None:  # rank 0: it has every rank's predictions
        try:
            errors, mask = preds.errors(Protocol(landmark_set))
            record = {**conformal.calibrate(errors, mask, coverage, landmark_set.names, landmark_set.unit, split,
                                            bool(options.flip_test and landmark_set.can_flip)),
                      "shards": {"location": manifest.location, "sha256": manifest.digest}}
        except conformal.TooFewToCalibrate as exc:
            refused[0] = (True, f"{dataset} {exc}")
        except InputError as exc:  # predictions that are not finite
            refused[0] = (False, str(exc))
    distributed.broadcast_from_rank0(refused)  # every rank raises alike (fine-tuning skips a calibration too few allow)
    if refused[0]:
        too_few, why = refused[0]
        raise conformal.TooFewToCalibrate(why) if too_few else InputError(why)
    return record


def calibration_shortfall(manifest: Manifest, dataset: str, split: str, coverage: float) -> str | None:
    """Why `split` is too small to calibrate at `coverage`, with the way to a larger one; None if it is not."""
    info = manifest.datasets[dataset]
    images, needed = info.splits.get(split, 0), conformal.minimum_images(coverage)
    if images >= needed:
        return None
    rule = info.source.get("validation", {}).get("rule", "carved from train")
    how = {"carved from train": f"--opt {dataset}.val_fraction=F",
           "val list": f"a longer --opt {dataset}.val_list=FILE: this val split is the list's"}.get(
        rule, f"this val split is the source's ({rule}); docs/splits.md lists the options that change it")
    return (f"{images} {split!r} image(s) of {dataset} are too few to calibrate at {coverage:.0%} coverage: at least "
            f"{needed} are needed; rebuild the shards with a larger val split ({how})")


def calibrate_bundle(bundle_dir, shards: str, dataset: str | None = None, split: str = "val",
                     coverage: float = 0.9, options: EvalOptions = EvalOptions()) -> dict:
    """`medsapiens calibrate`: store the radii in the bundle's config.json (other heads' calibrations kept)."""
    refuse_unfit_split(split, bundlelib.read_config(bundle_dir))  # before the weights are read
    model, bundle = bundlelib.load(bundle_dir, options.device)
    dataset = dataset or only_head(bundle)
    calibration = calibrate_model(model, bundle, load_manifest(shards), dataset, split, coverage, options)
    assert calibration is not None  # one process: rank 0
    bundle.calibration = {**bundle.calibration, dataset: calibration}
    bundlelib.write_config(bundle_dir, bundle)
    return calibration


def only_head(bundle: bundlelib.Bundle) -> str:
    if len(bundle.heads) != 1:
        raise ManifestError(f"the bundle has heads {', '.join(bundle.heads)}: choose one with --dataset")
    return next(iter(bundle.heads))


def selection_of(bundle: bundlelib.Bundle) -> dict:
    """How the bundle's checkpoint was chosen, from its provenance (the split and the rule)."""
    chosen = bundle.provenance.get("selection") or {}
    return {"split": chosen.get("split"), "rule": chosen.get("rule", "not recorded"),
            "stage": bundle.provenance.get("stage")}


def write_overlays(panels, out_dir: Path) -> None:
    """True (green) and predicted (red) landmarks with error lines, one PNG per image."""
    if panels:
        out_dir.mkdir(parents=True, exist_ok=True)
    for image_id, image, pred, truth in panels:
        Image.fromarray(draw_landmarks(image, truth, pred)).save(out_dir / f"{safe_name(image_id)}.png")


def evaluate_bundle(bundle_dir, shards: str, dataset: str | None, split: str, out_dir,
                    options: EvalOptions = EvalOptions()) -> dict:
    model, bundle = bundlelib.load(bundle_dir, options.device)
    report = evaluate_model(model, bundle, load_manifest(shards), dataset or only_head(bundle), split, out_dir, options)
    assert report is not None  # one process: rank 0
    return report


def summary_line(report: dict) -> str:
    sdr = ", ".join(f"SDR@{r}: {v:.2f}%" for r, v in report["sdr"].items())
    rejected = report.get("rejected_at_build")
    left_out = len(report.get("excluded_images", {}))
    kept = (f"{report['images']} images" + (f"; {left_out} left out, named in the report" if left_out else "")
            + (f"; {rejected} more rejected at the shards' build" if rejected else ""))
    return (f"{report['dataset']}: MRE {report['mre']:.3f} +- {report['mre_std_images']:.3f} {report['unit']} "
            f"(+- over images; {kept}), {sdr}")

