"""Evaluation reports: report.json, report.md and per_image.csv (and overlays), plus scoring
predictions made by any tool from JSON files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from medsapiens import registry
from medsapiens.metrics import Protocol, radial_errors, summarize
from medsapiens.registry import LandmarkSet


def build_report(errors: np.ndarray, mask: np.ndarray, ids: list[str], protocol: Protocol, dataset: str,
                 source: str) -> dict:
    landmark_set = protocol.landmark_set
    summary = summarize(errors, landmark_set.sdr_radii, protocol.sdr_convention, mask, landmark_set.names, ids)
    return {
        "dataset": dataset,
        "source": source,
        "unit": protocol.unit,
        "protocol": protocol.description(),
        "sdr_convention": f"error {protocol.sdr_convention} r",
        "std_meaning": {"mre_std_landmarks": "std over all (image, landmark) errors",
                        "mre_std_images": "std of per-image mean errors (the +- MedSapiens prints)"},
        **summary,
    }


def write_report(report: dict, errors: np.ndarray, ids: list[str], names, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    with open(out / "per_image.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", f"mre_{report['unit']}", *names])
        for image_id, row in zip(ids, errors):
            writer.writerow([image_id, f"{np.nanmean(row):.4f}", *(f"{e:.4f}" for e in row)])
    return out


def markdown(report: dict) -> str:
    unit, radii = report["unit"], list(report["sdr"])
    lines = [
        f"# Evaluation: {report['dataset']} ({report['source']})",
        "",
        f"{report['images']} images, {report['landmarks']} landmarks. Protocol: {report['protocol']}. "
        f"SDR counts {report['sdr_convention']}.",
        *selection_lines(report),
        "",
        f"| MRE ({unit}) | std over landmarks | std of image means | " + " | ".join(f"SDR {r} {unit}" for r in radii) + " |",
        "|---:|---:|---:|" + "---:|" * len(radii),
        f"| {report['mre']:.3f} | {report['mre_std_landmarks']:.3f} | {report['mre_std_images']:.3f} | "
        + " | ".join(f"{report['sdr'][r]:.2f}%" for r in radii) + " |",
        "",
        "## Per landmark",
        "",
        f"| landmark | MRE ({unit}) | " + " | ".join(f"SDR {r}" for r in radii) + " |",
        "|---|---:|" + "---:|" * len(radii),
    ]
    for name, row in report["per_landmark"].items():
        lines.append(f"| {name} | {row['mre']:.3f} | " + " | ".join(f"{row['sdr'][r]:.1f}%" for r in radii) + " |")
    lines += ["", "## Worst images", "", f"| image | MRE ({unit}) |", "|---|---:|"]
    lines += [f"| {w['id']} | {w['mre']:.3f} |" for w in report["worst"]]
    return "\n".join(lines) + "\n"


def selection_lines(report: dict) -> list[str]:
    """Which split chose the checkpoint and which one is scored: a reader must see both."""
    if "evaluated_on" not in report:
        return []
    chosen = report["selected_on"]
    split = f"the {chosen['split']!r} split" if chosen["split"] else "no split"
    return ["", f"Evaluated on the {report['evaluated_on']!r} split{' with flip test' if report['flip_test'] else ''}; "
                f"checkpoint selected on {split} ({chosen['stage']}: {chosen['rule']})."]


def _read_json(path: str | Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} file {path} is not valid JSON: {exc}") from None


def score_files(predictions: str | Path, ground_truth: str | Path, wrist_landmarks=None, convention: str = "<"):
    """Score `{"dataset", "landmarks": {id: [[x, y], ...]}}` files in original pixels.

    The ground truth may add `spacing_mm` {id: [sx, sy]}, `image_size` {id: [W, H]} and, for a
    dataset outside the registry, `landmark_set` (a registry entry). Returns (report, errors, ids).
    """
    pred, gt = _read_json(predictions, "predictions"), _read_json(ground_truth, "ground-truth")
    dataset = gt.get("dataset")
    if pred.get("dataset") != dataset:
        raise ValueError(f"predictions are for dataset {pred.get('dataset')!r}, ground truth for {dataset!r}")
    landmark_set = LandmarkSet.from_dict(gt["landmark_set"]) if "landmark_set" in gt else registry.get(dataset)
    missing = sorted(set(gt["landmarks"]) - set(pred["landmarks"]))
    extra = sorted(set(pred["landmarks"]) - set(gt["landmarks"]))
    if missing or extra:
        raise ValueError(f"{len(missing)} ground-truth image(s) without prediction {missing[:10]}, "
                         f"{len(extra)} prediction(s) without ground truth {extra[:10]}")
    ids = sorted(gt["landmarks"])
    protocol = Protocol(landmark_set, wrist_landmarks, convention)
    k = landmark_set.num_landmarks
    for name, table in (("predictions", pred), ("ground truth", gt)):
        bad = [i for i in ids if np.shape(table["landmarks"][i]) != (k, 2)]
        if bad:
            raise ValueError(f"{name} for image(s) {bad[:10]} do not have {k} [x, y] landmarks")
    factors = []
    for image_id in ids:
        spacing = gt.get("spacing_mm", {}).get(image_id)
        if spacing is None and landmark_set.native_spacing_mm:
            spacing = [landmark_set.native_spacing_mm] * 2
        size = gt.get("image_size", {}).get(image_id)
        if protocol.rule == "frame" and size is None:
            raise ValueError(f"the {dataset} protocol needs image_size for image {image_id!r} in the ground truth")
        factors.append(protocol.unit_per_pixel(np.asarray(gt["landmarks"][image_id]), spacing, size, image_id))
    errors = radial_errors(np.array([pred["landmarks"][i] for i in ids]), np.array([gt["landmarks"][i] for i in ids]),
                           np.stack(factors))
    report = build_report(errors, np.ones_like(errors, dtype=bool), ids, protocol, dataset, f"predictions {predictions}")
    return report, errors, ids
