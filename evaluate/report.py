"""Evaluation reports: report.json, report.md and per_image.csv (and overlays), plus scoring
predictions made by any tool from JSON files."""
from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from medsapiens.errors import InputError
from medsapiens.evaluate.figures import CED, PER_LANDMARK, report_figures
from medsapiens.evaluation.metrics import Protocol, radial_errors, scales_digest, summarize
from medsapiens.io import jsondoc, registry
from medsapiens.io.record import is_finite_number
from medsapiens.io.registry import LandmarkSet

NOTHING_VISIBLE = "no landmark visible in the ground truth: nothing to measure"


def build_report(errors: np.ndarray, mask: np.ndarray, ids: list[str], protocol: Protocol, dataset: str,
                 source: str, unit_per_pixel: np.ndarray, excluded_images: dict[str, str] | None = None) -> dict:
    """The report of (N, K) errors where `mask` holds, converted to the unit by each image's (sx, sy) in
    `unit_per_pixel`; `excluded_images` (id: reason) are the images the protocol could not scale, their
    rows all out of `mask`: counted apart from the images scored, as are the images with no landmark visible
    in the ground truth (nothing of them is measured)."""
    landmark_set = protocol.landmark_set
    summary = summarize(errors, landmark_set.sdr_radii, protocol.sdr_convention, mask, landmark_set.names, ids)
    nothing_visible = {ids[n]: NOTHING_VISIBLE for n in np.flatnonzero(~np.asarray(mask, dtype=bool).any(axis=1))}
    excluded_images = {**nothing_visible, **(excluded_images or {})}
    scored = np.array([i not in excluded_images for i in ids], dtype=bool)
    report = {
        "dataset": dataset,
        "source": source,
        "unit": protocol.unit,
        "protocol": protocol.description(),
        "sdr_convention": f"error {protocol.sdr_convention} r",
        "std_meaning": {"mre_std_landmarks": "std over all (image, landmark) errors",
                        "mre_std_images": "std of per-image mean errors (the +- MedSapiens prints)"},
        **summary,
        "images": int(scored.sum()),
        "excluded_landmarks": int((~np.asarray(mask, dtype=bool)[scored]).sum()),  # invisible in the ground truth
    }
    if excluded_images:
        report["excluded_images"] = dict(excluded_images)
    if protocol.rule != "wrist_width":  # a wrist width comes from the ground truth, which `annotations` compares
        report["scales_digest"] = scales_digest(ids, unit_per_pixel)
    return report


REPORT_FILES = ("report.json", "report.md", "per_image.csv", CED, PER_LANDMARK)
OVERLAYS = "overlays"


def refuse_earlier_report(out: Path) -> None:
    if (out / "report.json").is_file():
        raise InputError(f"--out {out} holds an earlier report; give --overwrite to replace it, or another --out")


def remove_earlier_report(out: Path) -> None:
    """An earlier report's files and overlays in `out` (nothing else there), removed just before a new report
    is written, so that no earlier file is taken for this report's."""
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    for overlay in (out / OVERLAYS).glob("*.png"):
        overlay.unlink()


def write_report(report: dict, errors: np.ndarray, ids: list[str], names, out_dir: str | Path) -> Path:
    """report.json, report.md with its figures (CED curve, per-landmark MRE) and per_image.csv; `errors`
    (N, K) are NaN where the ground truth has no landmark."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_figures(report, errors, out)
    (out / "report.json").write_text(jsondoc.dumps(report) + "\n")
    (out / "report.md").write_text(markdown(report))
    with open(out / "per_image.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", f"mre_{report['unit']}", *names])
        for image_id, row in zip(ids, errors, strict=True):
            mean = np.nanmean(row) if np.isfinite(row).any() else np.nan  # nan: the image was left out
            writer.writerow([image_id, f"{mean:.4f}", *(f"{e:.4f}" for e in row)])
    return out


def markdown(report: dict) -> str:
    unit, radii = report["unit"], list(report["sdr"])
    lines = [
        f"# Evaluation: {report['dataset']} ({report['source']})",
        "",
        f"{report['images']} images, {report['landmarks']} landmarks ({report.get('excluded_landmarks', 0)} invisible "
        f"in the ground truth, left out){images_left_out(report)}. Protocol: {report['protocol']}. "
        f"SDR counts {report['sdr_convention']}.",
        *(f"Left out: {image_id}: {reason}." for image_id, reason in report.get("excluded_images", {}).items()),
        *([f"Not in these numbers: {report['rejected_at_build']} image(s) of this split rejected when the shards were "
           "built (each with its reason in the shards' rejected.jsonl)."] if report.get("rejected_at_build") else []),
        *selection_lines(report),
        *annotation_lines(report),
        "",
        f"| MRE ({unit}) | std over all errors | std of image means | " + " | ".join(f"SDR {r} {unit}" for r in radii) + " |",
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
    lines += ["", "## Figures", "", f"Cumulative error distribution (the SDR radii dashed): ![CED]({CED})", "",
              f"MRE per landmark: ![per-landmark MRE]({PER_LANDMARK})"]
    lines += coverage_lines(report)
    lines += ["", "## Worst images", "", f"| image | MRE ({unit}) |", "|---|---:|"]
    lines += [f"| {w['id']} | {w['mre']:.3f} |" for w in report["worst"]]
    return "\n".join(lines) + "\n"


def images_left_out(report: dict) -> str:
    count = len(report.get("excluded_images", {}))
    return f"; {count} more image(s) left out, each named below" if count else ""


IN_SAMPLE = (", on the split the radii were calibrated on: not held out, so at least the nominal level by "
             "construction (evaluate another split to measure it)")


def shards_named(shards) -> str:
    """", of the shards at LOCATION (manifest sha256 PREFIX)" for a calibration that records them (older ones do not)."""
    if not isinstance(shards, dict):
        return ""
    return f" of the shards at `{shards.get('location')}`, manifest sha256 {str(shards.get('sha256'))[:12]}"


def coverage_lines(report: dict) -> list[str]:
    """The conformal radii's empirical coverage on this split, when the bundle is calibrated."""
    if "coverage_not_measured" in report:
        return ["", "## Conformal error bounds", "", f"Coverage not measured: {report['coverage_not_measured']}."]
    if "coverage" not in report:
        return []
    c = report["coverage"]
    lines = ["", "## Conformal error bounds", "",
             f"Per-landmark radii calibrated on the {c['calibrated_on']!r} split ({c['calibration_images']} images"
             f"{shards_named(c.get('calibration_shards'))}) at "
             f"{c['nominal']:.0%} nominal coverage; bound: {c['bound']}. Empirical coverage here: "
             f"**{c['overall']:.1%}** overall{IN_SAMPLE if c.get('held_out') is False else ''}.", "",
             f"| landmark | radius ({c['unit']}) | coverage |", "|---|---:|---:|"]
    lines += [f"| {name} | {row['radius']:.3f} | {row['coverage']:.1%} |" for name, row in c["per_landmark"].items()]
    return lines


def selection_lines(report: dict) -> list[str]:
    """Which split chose the checkpoint and which one is scored: a reader must see both."""
    if "evaluated_on" not in report:
        return []
    chosen = report["selected_on"]
    split = f"the {chosen['split']!r} split" if chosen["split"] else "no split"
    return ["", f"Evaluated on the {report['evaluated_on']!r} split{' with flip test' if report['flip_test'] else ''}; "
                f"checkpoint selected on {split} ({chosen['stage']}: {chosen['rule']})."]


def annotation_lines(report: dict) -> list[str]:
    """The reader and options that built the shards: the ground truth and test images behind the numbers."""
    read = report.get("annotations")
    if not isinstance(read, dict):
        return []
    options = read.get("options") if isinstance(read.get("options"), dict) else {}
    given = ", ".join(f"{k}={v}" for k, v in options.items()) or "its defaults"
    return ["", f"Ground truth and split as the shards' `{read.get('reader')}` reader read them, with {given}."]


def _read_json(path: str | Path, what: str):
    try:
        return jsondoc.read(path, f"{what} file {path}")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None


# Files `evaluate --predictions/--ground-truth` reads, each to a Table of (K, 2) arrays per image
# id, NaN where a landmark is invisible (null, or COCO v = 0):
# - ours: {"dataset", "landmarks": {id: [[x, y] | null, ...]}, "spacing_mm"?: {id: [sx, sy]},
#   "image_size"?: {id: [W, H]}, "names"?: [...], "landmark_set"?: {...}} (predict's predictions.json);
#   any other key is refused (a misspelled "dataset" would otherwise score by another protocol);
# - COCO keypoint ground truth: images[{id, file_name, width, height, spacing?}],
#   annotations[{image_id, keypoints: [x, y, v] * K}], categories[{keypoints: [names]}]; ids are
#   the file_name stems (as predict names its outputs);
# - COCO results: [{image_id, keypoints: [x, y, score] * K, ...}], image_id as in the COCO ground truth.


LANDMARK_FILE_KEYS = ("dataset", "landmarks", "spacing_mm", "image_size", "names", "landmark_set")


@dataclass
class Table:
    dataset: str | None
    landmarks: dict[str, np.ndarray]
    spacing_mm: dict = field(default_factory=dict)
    image_size: dict = field(default_factory=dict)
    names: list | None = None
    landmark_set: dict | None = None
    coco_ids: dict = field(default_factory=dict)  # COCO image id -> our id


def read_table(path: str | Path, what: str, coco_ids: dict | None = None) -> Table:
    data = _read_json(path, what)
    try:
        if isinstance(data, list):
            return coco_results(data, coco_ids or {})
        if "annotations" in data and "images" in data:
            return coco_ground_truth(data)
        unknown = sorted(set(data) - set(LANDMARK_FILE_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; a landmark file has {', '.join(LANDMARK_FILE_KEYS)}")
        if not isinstance(data.get("landmarks"), dict):
            raise TypeError('"landmarks" must map each image id to its list of points')
        for key in ("spacing_mm", "image_size"):
            if not isinstance(data.get(key, {}), dict):
                raise TypeError(f'"{key}" must map each image id to its [x, y] pair')
        return Table(data.get("dataset"), {str(i): points(v, f"image {i}") for i, v in data["landmarks"].items()},
                     data.get("spacing_mm", {}), data.get("image_size", {}), data.get("names"), data.get("landmark_set"))
    except InputError as exc:
        raise InputError(f"{what} file {path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise InputError(f"{what} file {path}: not a landmark file of a known format ({type(exc).__name__}: {exc}); "
                         "see `medsapiens evaluate --help`") from None


def points(landmarks, where: str) -> np.ndarray:
    """[[x, y] | null, ...] -> (K, 2) float, NaN for null; x and y finite numbers (not strings or bools, not
    NaN, which would pass for invisible, or infinity), exactly two."""
    if not isinstance(landmarks, list):
        raise TypeError(f"{where}: landmarks must be a list of [x, y] or null, got {landmarks!r:.80}")
    for k, p in enumerate(landmarks):
        if p is not None and not (isinstance(p, list) and len(p) == 2 and all(map(is_finite_number, p))):
            raise InputError(f"{where}, landmark {k}: expected [x, y] (two finite numbers) or null (invisible), "
                             f"got {p!r:.80}")
    return np.array([[np.nan, np.nan] if p is None else p for p in landmarks], dtype=np.float64)


def coco_points(keypoints, where: str, third_is_visibility: bool = True) -> np.ndarray:
    """(K, 2) from [x, y, v] * K: NaN where a ground truth's v is 0; a results file's third value is a
    score, which says nothing of whether the landmark was predicted. What is read must be finite: v, and
    x and y where they count (a NaN would pass for an invisible landmark)."""
    triples = np.asarray(keypoints, dtype=np.float64).reshape(-1, 3)
    counted = triples[:, 2] > 0 if third_is_visibility else np.ones(len(triples), dtype=bool)
    finite = np.isfinite(triples[:, :2]).all(axis=1) | ~counted
    if third_is_visibility:
        finite &= np.isfinite(triples[:, 2])
    if not finite.all():
        k = int(np.flatnonzero(~finite)[0])
        raise InputError(f"{where}, landmark {k}: keypoints must be finite numbers, got {triples[k].tolist()}")
    return np.where(counted[:, None], triples[:, :2], np.nan)


def coco_ground_truth(data: dict) -> Table:
    images = {entry["id"]: entry for entry in data["images"]}
    ids = {image_id: PurePosixPath(str(entry.get("file_name") or image_id)).stem for image_id, entry in images.items()}
    table = Table(None, {}, coco_ids=ids, names=(data.get("categories") or [{}])[0].get("keypoints"))
    for ann in data["annotations"]:
        image_id, entry = ids[ann["image_id"]], images[ann["image_id"]]
        if image_id in table.landmarks:
            raise InputError(f"image {ann['image_id']!r} has more than one annotation; the ground truth is one per image")
        table.landmarks[image_id] = coco_points(ann["keypoints"], f"image {ann['image_id']!r}")
        if entry.get("spacing") is not None:
            table.spacing_mm[image_id] = entry["spacing"]  # checked where it converts errors to mm
        if entry.get("width") and entry.get("height"):
            table.image_size[image_id] = [int(entry["width"]), int(entry["height"])]
    return table


def coco_results(results: list, coco_ids: dict) -> Table:
    table = Table(None, {})
    for result in results:
        image_id = coco_ids.get(result["image_id"], str(result["image_id"]))
        if image_id in table.landmarks:
            raise InputError(f"image {result['image_id']!r} has more than one result; keep one per image (the "
                             "highest-scoring detection)")
        table.landmarks[image_id] = coco_points(result["keypoints"], f"image {result['image_id']!r}",
                                                third_is_visibility=False)
    return table


def check_landmark_order(name_lists: dict[str, object]) -> None:
    """Lists that name one landmark at different places would score it against another: refused."""
    lists = {who: list(names) for who, names in name_lists.items()
             if isinstance(names, list | tuple) and all(isinstance(n, str) for n in names)}
    for (a, x), (b, y) in itertools.combinations(lists.items(), 2):
        misplaced = registry.misplaced_name(x, y)
        if misplaced:
            i, j = misplaced
            raise InputError(f"the {a} and the {b} order the landmarks differently ({x[i]!r} is landmark {i} in "
                             f"the {a}, {j} in the {b}): put them in one order")


def landmark_set_for(dataset: str | None, gt: Table, k: int, ids: list[str]) -> LandmarkSet:
    """The registry's set; else the ground truth's `landmark_set`; else one defined by the data (names from
    the file or numbered; mm when every image has a spacing, else px)."""
    if dataset in registry.BUILTIN:
        return registry.get(dataset)
    if gt.landmark_set:
        return LandmarkSet.from_dict(gt.landmark_set)
    unit = "mm" if ids and all(i in gt.spacing_mm for i in ids) else "px"
    return registry.custom(dataset or "custom", gt.names or [str(n) for n in range(k)], unit=unit)


def score_files(predictions: str | Path, ground_truth: str | Path, wrist_landmarks=None, convention: str = "<",
                dataset: str | None = None):
    """Score prediction and ground-truth files (formats above) in original pixels, by the protocol of
    the dataset they name (which `dataset`, when given, must be), else of `dataset`. Landmarks invisible
    in the ground truth are left out and counted (`excluded_landmarks`). Returns (report, errors, ids)."""
    gt = read_table(ground_truth, "ground-truth")
    pred = read_table(predictions, "predictions", gt.coco_ids)
    if pred.dataset and gt.dataset and pred.dataset != gt.dataset:
        raise InputError(f"predictions are for dataset {pred.dataset!r}, ground truth for {gt.dataset!r}")
    named = gt.dataset or pred.dataset
    if dataset and named and dataset != named:
        raise InputError(f"--dataset {dataset}: the files are for dataset {named!r}")
    dataset = named or dataset
    check_landmark_order({"predictions": pred.names, "ground truth": gt.names,
                          f"registry's {dataset!r} set": registry.BUILTIN[dataset].names if dataset in registry.BUILTIN else None})
    missing = sorted(set(gt.landmarks) - set(pred.landmarks))
    extra = sorted(set(pred.landmarks) - set(gt.landmarks))
    if missing or extra:
        raise InputError(f"{len(missing)} ground-truth image(s) without prediction {missing[:10]}, "
                         f"{len(extra)} prediction(s) without ground truth {extra[:10]}")
    ids = sorted(gt.landmarks)
    if not ids:
        raise InputError(f"{ground_truth} and {predictions} hold no image to score")
    k = len(gt.landmarks[ids[0]])
    try:
        landmark_set = landmark_set_for(dataset, gt, k, ids)
    except (TypeError, ValueError) as exc:  # the ground truth's own landmark_set
        raise InputError(f"{ground_truth}: {exc}") from None
    check_wrist_landmarks(wrist_landmarks, landmark_set)
    protocol = Protocol(landmark_set, wrist_landmarks, convention)
    k = landmark_set.num_landmarks
    for name, table in (("predictions", pred), ("ground truth", gt)):
        bad = [i for i in ids if table.landmarks[i].shape != (k, 2)]
        if bad:
            raise InputError(f"{name} for image(s) {bad[:10]} do not have {k} [x, y] landmarks")
    truth = np.stack([gt.landmarks[i] for i in ids])
    guess = np.stack([pred.landmarks[i] for i in ids])
    visible = ~np.isnan(truth).any(axis=-1)
    unpredicted = [ids[n] for n in np.flatnonzero((np.isnan(guess).any(axis=-1) & visible).any(axis=1))]
    if unpredicted:
        raise InputError(f"predictions for image(s) {unpredicted[:10]} leave out landmarks the ground truth has")
    unscaled = protocol.unscalable_images(visible, ids)
    visible[[ids.index(i) for i in unscaled]] = False
    factors = np.stack([np.ones(2) if i in unscaled else unit_per_pixel(protocol, gt, i, truth[n])
                        for n, i in enumerate(ids)])
    errors = radial_errors(guess, np.where(visible[..., None], truth, guess), factors)
    report = build_report(errors, visible, ids, protocol, landmark_set.id, f"predictions {predictions}", factors,
                          unscaled)
    return report, np.where(visible, errors, np.nan), ids


def check_wrist_landmarks(pair: tuple[int, int] | None, landmark_set: LandmarkSet) -> None:
    """--hand-landmarks A,B: two landmarks of a set scaled by its wrist width (negative indices would count
    from the end)."""
    if pair is None:
        return
    if Protocol(landmark_set).rule != "wrist_width":
        raise InputError(f"--hand-landmarks {pair[0]},{pair[1]}: {landmark_set.id}'s errors are not scaled by a wrist "
                         "width, so the flag would change nothing; leave it out")
    if not all(0 <= i < landmark_set.num_landmarks for i in pair):
        raise InputError(f"--hand-landmarks {pair[0]},{pair[1]}: {landmark_set.id} has landmarks "
                         f"0..{landmark_set.num_landmarks - 1}")


def unit_per_pixel(protocol: Protocol, gt: Table, image_id: str, truth: np.ndarray) -> np.ndarray:
    spacing = protocol.landmark_set.spacing_or_native(gt.spacing_mm.get(image_id))
    size = gt.image_size.get(image_id)
    if protocol.rule == "frame" and size is None:
        raise InputError(f"the {protocol.landmark_set.id} protocol needs image_size for image {image_id!r} in the "
                         "ground truth")
    return protocol.unit_per_pixel(truth, spacing, size, image_id)
