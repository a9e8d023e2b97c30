"""`medsapiens evaluate`: a bundle on a shard split, or any tool's predictions against ground truth,
scored by the dataset's protocol in original-image pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medsapiens.evaluate.report import build_report, write_report
from medsapiens.model import bundle as bundlelib
from medsapiens.evaluation import conformal
from medsapiens import distributed
from medsapiens.data.pipeline import is_test_split
from medsapiens.errors import InputError
from medsapiens.evaluation.inference import predict_split
from medsapiens.io.manifest import Manifest, ManifestError, load as load_manifest
from medsapiens.evaluation.metrics import Protocol
from medsapiens.io.record import safe_name
from medsapiens.evaluation.visualize import draw_landmarks


def check_split(manifest: Manifest, dataset: str, split: str, bundle: bundlelib.Bundle) -> None:
    splits = manifest.datasets[dataset].splits if dataset in manifest.datasets else {}
    if not splits.get(split):
        raise ManifestError(f"{manifest.location}: dataset {dataset!r} has no {split!r} samples "
                            f"(splits: {', '.join(f'{s} {n}' for s, n in sorted(splits.items())) or 'none'})")
    if dataset not in bundle.heads:
        raise ManifestError(f"the bundle has no head for {dataset!r} (heads: {', '.join(bundle.heads)})")
    k = manifest.landmark_set(dataset).num_landmarks
    if bundle.heads[dataset] != k:
        raise ManifestError(f"the bundle's {dataset!r} head predicts {bundle.heads[dataset]} landmarks, "
                            f"the shards have {k}")


def evaluate_model(model, bundle: bundlelib.Bundle, manifest: Manifest, dataset: str, split: str, out_dir,
                   flip_test: bool = False, batch_size: int = 8, overlays: int = 0, wrist_landmarks=None,
                   convention: str = "<", device="cpu") -> dict | None:
    """Predict a split on every rank; rank 0 writes the report files and returns the report."""
    check_split(manifest, dataset, split, bundle)
    landmark_set = manifest.landmark_set(dataset)
    preds = predict_split(model, manifest, dataset, model.dataset_ids.index(dataset), split, bundle.input_size,
                          device, next(model.parameters()).dtype, batch_size, flip_test, panels=overlays,
                          margin=bundle.codec.margin, blur_kernel=bundle.codec.blur_kernel)
    report = [None]

    def score() -> None:
        protocol = Protocol(landmark_set, wrist_landmarks, convention)
        errors, mask = preds.errors(protocol)
        flip = " with flip test" if flip_test and landmark_set.can_flip else ""
        report[0] = build_report(errors, mask, preds.ids, protocol, dataset, f"{split} split of {manifest.location}{flip}")
        report[0].update(evaluated_on=split, flip_test=bool(flip), selected_on=selection_of(bundle))
        if dataset in bundle.calibration:
            report[0]["coverage"] = conformal.coverage_report(errors, mask, bundle.calibration[dataset],
                                                              landmark_set.names)
        write_report(report[0], np.where(mask, errors, np.nan), preds.ids, landmark_set.names, out_dir)
        write_overlays(preds.panels, Path(out_dir) / "overlays")

    distributed.decide_on_rank0(score)  # a bad image stops every rank, not rank 0 alone
    return report[0]


def refuse_test_split(split: str) -> None:
    if is_test_split(split):
        raise InputError(f"calibration split {split!r} is a test split: the coverage reported there would no longer "
                         "be held out. Calibrate on 'val' (shards build carves one: --opt ID.val_fraction=F)")


def calibrate_model(model, bundle: bundlelib.Bundle, manifest: Manifest, dataset: str, split: str = "val",
                    coverage: float = 0.9, flip_test: bool = True, batch_size: int = 8, device="cpu") -> dict | None:
    """Split conformal radii per landmark on `split` (never a test split), with flip test as evaluation
    and predict use it by default; every rank predicts, rank 0 returns the calibration record."""
    refuse_test_split(split)
    conformal.check_coverage(coverage)
    check_split(manifest, dataset, split, bundle)
    shortfall = calibration_shortfall(manifest, dataset, split, coverage)
    if shortfall:
        raise InputError(shortfall)
    landmark_set = manifest.landmark_set(dataset)
    preds = predict_split(model, manifest, dataset, model.dataset_ids.index(dataset), split, bundle.input_size,
                          device, next(model.parameters()).dtype, batch_size, flip_test,
                          margin=bundle.codec.margin, blur_kernel=bundle.codec.blur_kernel)
    if preds is None:
        return None
    errors, mask = preds.errors(Protocol(landmark_set))
    return conformal.calibrate(errors, mask, coverage, landmark_set.names, landmark_set.unit, split,
                               bool(flip_test and landmark_set.can_flip))


def calibration_shortfall(manifest: Manifest, dataset: str, split: str, coverage: float) -> str | None:
    """Why `split` is too small to calibrate at `coverage`, with the way to a larger one; None if it is not."""
    images, needed = manifest.datasets[dataset].splits.get(split, 0), conformal.minimum_images(coverage)
    if images >= needed:
        return None
    return (f"{images} {split!r} image(s) of {dataset} are too few to calibrate at {coverage:.0%} coverage: at least "
            f"{needed} are needed; rebuild the shards with a larger val split (--opt {dataset}.val_fraction=F)")


def calibrate_bundle(bundle_dir, shards: str, dataset: str | None = None, split: str = "val",
                     coverage: float = 0.9, **options) -> dict:
    """`medsapiens calibrate`: store the radii in the bundle's config.json (other heads' calibrations kept)."""
    refuse_test_split(split)
    model, bundle = bundlelib.load(bundle_dir, options.get("device", "cpu"))
    dataset = dataset or only_head(bundle)
    calibration = calibrate_model(model, bundle, load_manifest(shards), dataset, split, coverage, **options)
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


def evaluate_bundle(bundle_dir, shards: str, dataset: str | None, split: str, out_dir, **options) -> dict:
    model, bundle = bundlelib.load(bundle_dir, options.get("device", "cpu"))
    return evaluate_model(model, bundle, load_manifest(shards), dataset or only_head(bundle), split, out_dir, **options)


def summary_line(report: dict) -> str:
    sdr = ", ".join(f"SDR@{r}: {v:.2f}%" for r, v in report["sdr"].items())
    return (f"{report['dataset']}: MRE {report['mre']:.3f} +- {report['mre_std_images']:.3f} {report['unit']} "
            f"(+- over images; {report['images']} images), {sdr}")

