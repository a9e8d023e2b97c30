"""`medsapiens predict`: landmarks on new images (PNG, JPG, BMP, TIFF, DICOM) from a bundle or an ONNX model.

Writes one JSON per image (pixels of the original image; millimetres too when the spacing is
known: `--spacing` wins, else the DICOM tags; the conformal radius of each landmark when the model is
calibrated; `outside_image` names the landmarks placed outside the image), `predictions.json` in the
format `medsapiens evaluate --predictions` reads, optional overlays, and `failures.json` listing every
input that could not be read or predicted (NaN or infinite output: `non_finite_prediction`; an id
`predictions` or `failures`: `reserved_id`; in a folder, an image of another format:
`unsupported_image`, a link to nothing: `missing_image`) and every folder that could not be listed
(`unreadable_folder`), with the reason. A run stopped by SIGTERM or SIGHUP still writes both summaries;
one killed outright leaves its journal, `in_progress.jsonl`, naming the files it wrote.
Each input is isolated: one bad file is listed, the others
complete, and both JSON files are always written. An --out holding an earlier run's predictions is
refused (the two runs' files would mix), as is one holding a killed run's journal, unless `overwrite`,
which first removes that run's files.

This module imports no torch: with `--onnx` the model runs on onnxruntime (medsapiens.deploy.runtime),
else on torch (medsapiens.evaluation.inference.BundleLandmarker, imported only then).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medsapiens.errors import InputError
from medsapiens.evaluation import conformal
from medsapiens.evaluation.metrics import Protocol
from medsapiens.evaluation.visualize import draw_landmarks
from medsapiens.io import jsondoc, registry, storage
from medsapiens.io.imageio import decode, dicom_spacing, is_dicom, to_float
from medsapiens.io.processes import ended_like_ctrl_c
from medsapiens.io.record import Rejection

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".tif", ".tiff", ".dcm"}
# Images of other formats found in a folder are listed as failures, not passed over like other files.
OTHER_IMAGE_SUFFIXES = {".webp", ".gif", ".jp2", ".j2k", ".jpx", ".heic", ".heif", ".avif", ".tga", ".pgm", ".ppm",
                        ".pnm", ".pbm", ".psd", ".dicom", ".nii", ".nrrd", ".mha", ".mhd"}
# The summary files' stems: an image with one of these ids would overwrite them, or they it.
RESERVED_IDS = {"predictions", "failures"}
# Lists each id before its files are written and goes once the summaries are: a run killed outright
# (SIGKILL, the OOM killer) leaves it behind, naming the files it wrote.
JOURNAL = "in_progress.jsonl"


def collect_inputs(inputs: list[str], failures: list[dict] | None = None) -> list[Path]:
    """Files as given and image files found under folders (sorted); a file reached twice (named and
    inside a folder named too, or two spellings of one path) counts once. A folder that cannot be
    listed is added to `failures` as `unreadable_folder` (raised when `failures` is None)."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += folder_images(item, failures)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    if not paths and not failures:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(inputs)}")
    first_spelling: dict[Path, Path] = {}
    for path in paths:
        first_spelling.setdefault(path.resolve(), path)
    return list(first_spelling.values())


def walk_files(folder: Path, failures: list[dict] | None):
    """Every file under `folder`, through linked folders too (each real folder once: a link back up is
    no loop)."""
    def unreadable(exc: OSError) -> None:
        if failures is None:
            raise exc
        failures.append(failure(Path(exc.filename), "unreadable_folder",
                                f"{exc.filename}: {exc.strerror}; the images in it were not predicted"))

    walked = set()
    for root, folders, files in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:
            folders.clear()
            continue
        walked.add(real)
        yield from (Path(root) / name for name in files)


def folder_images(folder: Path, failures: list[dict] | None) -> list[Path]:
    """The image files under `folder`, sorted. Images predict does not read (another format, a link to
    nothing) are listed in `failures` (raised when it is None); files of other kinds are passed over."""
    found = []
    for path in sorted(walk_files(folder, failures)):
        if is_image_file(path):
            found.append(path)
        elif problem := unread_image(path):
            if failures is None:
                raise InputError(problem[1])
            failures.append(failure(path, *problem))
    return found


def unread_image(path: Path) -> tuple[str, str] | None:
    """(reason, detail) for an image file predict does not read; None for a file of another kind."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES and path.is_symlink() and not path.exists():
        return "missing_image", f"{path}: a link to {os.readlink(path)}, which does not exist"
    if suffix in IMAGE_SUFFIXES and not path.is_file():
        return "unreadable_image", f"{path}: not a regular file (a pipe, device or socket): not read"
    if suffix in OTHER_IMAGE_SUFFIXES:
        return "unsupported_image", (f"{path}: {path.suffix} images are not read (PNG, JPEG, BMP, TIFF and DICOM are): "
                                     "convert it")
    return None


def is_image_file(path: Path) -> bool:
    """By suffix, or by the DICOM preamble for PACS-style files without an extension."""
    return path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path))


def read_input(path: Path, spacing, frame: int | None = None):
    """(float image on 0-255, spacing (sx, sy) or None, where the spacing came from): an explicit
    `--spacing` wins over the DICOM tags."""
    pixels = decode(str(path), frame)
    if spacing is not None:
        return to_float(pixels), spacing, "--spacing"
    if is_dicom(path):
        from_tags, source = dicom_spacing(path)
        if from_tags is not None:
            return to_float(pixels), from_tags, source
    return to_float(pixels), None, None


def failure(path: Path, reason: str, detail: str) -> dict:
    return {"image": str(path), "reason": reason, "detail": detail}


def inside_image(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Per landmark: within the (W, H) image's pixel area (centres on integers, so [-0.5, size - 0.5))."""
    width, height = size
    x, y = points[:, 0], points[:, 1]
    return (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)


@dataclass
class Pending:
    """An image read and made ready for the model, until its batch is predicted. Only its model input is
    kept, not the full-size image (a batch of 8 large radiographs took gigabytes), unless it is drawn."""

    path: Path
    prepared: object  # the landmarker's model input and affine
    size: tuple[int, int]  # (W, H) of the original image
    spacing: tuple[float, float] | None
    source: str | None  # where the spacing came from
    image: np.ndarray | None  # kept only for an overlay


def result_for(path: Path, points: np.ndarray, scores: np.ndarray, size: tuple[int, int], spacing, source, dataset,
               names, bounds: dict | None) -> dict:
    result = {
        "image": str(path), "id": path.stem, "dataset": dataset, "size": list(size),
        "names": list(names), "landmarks": np.round(points, 3).tolist(), "scores": np.round(scores, 4).tolist(),
        "spacing_mm": list(spacing) if spacing else None, "spacing_source": source,
        "outside_image": [name for name, inside in zip(names, inside_image(points, size), strict=True) if not inside],
    }
    if spacing:
        result["landmarks_mm"] = np.round(points * np.asarray(spacing), 3).tolist()
    if bounds:
        result.update(bounds)
    return result


def open_landmarker(bundle_dir, onnx, device: str, flip_test: bool | None):
    """The model: an ONNX file on onnxruntime (flip test as exported), else a bundle on torch."""
    if onnx:
        from medsapiens.deploy.runtime import OnnxLandmarker

        return OnnxLandmarker(onnx)
    from medsapiens.evaluation.inference import BundleLandmarker

    return BundleLandmarker(bundle_dir, device, True if flip_test is None else flip_test)


def check_flip_test(landmarker, dataset: str, flip_test: bool | None, onnx) -> None:
    exported = landmarker.flip_test[dataset]
    if onnx and flip_test is not None and flip_test != exported and landmarker.landmark_sets[dataset].can_flip:
        raise InputError(f"{onnx} was exported {'with' if exported else 'without'} flip test for {dataset!r}: "
                         f"drop --{'no-' if exported else ''}flip-test, or export it again")


class Bounds:
    """Each landmark's conformal radius, in the protocol's unit and (where convertible) in original pixels."""

    def __init__(self, landmark_set, calibration: dict | None):
        self.calibration = calibration
        self.protocol = Protocol(landmark_set)

    def of(self, points: np.ndarray, spacing, size) -> tuple[dict | None, np.ndarray | None]:
        if not self.calibration:
            return None, None
        pixels = conformal.radii_in_pixels(self.protocol, self.calibration["radii"], points,
                                 self.protocol.landmark_set.spacing_or_native(spacing), size)
        fields = {"radius": np.round(self.calibration["radii"], 4).tolist(), "radius_unit": self.calibration["unit"],
                  "radius_coverage": self.calibration["coverage"],
                  "radius_px": None if pixels is None else np.round(pixels, 3).tolist()}
        return fields, pixels


@dataclass(frozen=True)
class PredictOptions:
    """How `medsapiens predict` runs: which head, flip test (None: on for a bundle, as exported for an
    ONNX model), overlays, batch, the spacing that wins over DICOM tags, device, multi-frame DICOM frame."""

    dataset: str | None = None
    flip_test: bool | None = None
    overlays: bool = False
    batch_size: int = 8
    spacing: tuple[float, float] | None = None
    device: str = "cpu"
    frame: int | None = None
    overwrite: bool = False


def clear_earlier_run(out: Path, overwrite: bool) -> None:
    """Refuses an `out` holding an earlier run's files, or with `overwrite` removes them: the per-image
    JSONs and overlays of the ids that run wrote (its journal lists them when it was killed before its
    summaries, else predictions.json does), its summaries and its journal."""
    summary, journal = out / "predictions.json", out / JOURNAL
    killed = journal.is_file()
    if not (killed or summary.is_file()):
        return
    ids = journal_ids(journal) if killed else summary_ids(summary)
    if not overwrite:
        earlier = ("the files of an earlier run that was killed before it wrote its summaries" if killed else
                   "the predictions of an earlier run")
        raise InputError(f"--out {out} holds {earlier} ({len(ids)} image(s)); give --overwrite to replace them, "
                         "or another --out")
    for image_id in ids:
        (out / f"{image_id}.json").unlink(missing_ok=True)
        (out / "overlays" / f"{image_id}.png").unlink(missing_ok=True)
    for name in ("failures.json", "predictions.json", JOURNAL):
        (out / name).unlink(missing_ok=True)


def summary_ids(summary: Path) -> list[str]:
    earlier = jsondoc.parse(summary.read_bytes(), summary)
    ids = earlier.get("landmarks") if isinstance(earlier, dict) else None
    if not isinstance(ids, dict) or not all(map(is_image_id, ids)):
        raise InputError(f"--out {summary.parent}: {summary} is not a predictions file of `medsapiens predict`; "
                         "choose another --out")
    return list(ids)


def journal_ids(journal: Path) -> list[str]:
    """The ids a journal lists; a last line cut short by the kill is no id (its files were not begun)."""
    lines = journal.read_bytes().split(b"\n")[:-1]
    try:
        ids = [json.loads(line) for line in lines]
    except ValueError:
        ids = [None]
    if not all(map(is_image_id, ids)):
        raise InputError(f"--out {journal.parent}: {journal} is not a journal of `medsapiens predict`; choose "
                         "another --out")
    return ids


def is_image_id(image_id) -> bool:
    """An id names files inside --out only: no separator, no `.` or `..`."""
    return isinstance(image_id, str) and image_id == Path(image_id).name and image_id not in ("", ".", "..")


def predict(inputs: list[str], out_dir, options: PredictOptions = PredictOptions(), *, bundle_dir=None, onnx=None):
    """Landmarks of every image under `inputs`, from a bundle (torch) or an ONNX model; returns
    (results, failures). Ids are file stems; a second input with the same id, or an id of a summary
    file (RESERVED_IDS), is a failure, as is a folder that cannot be listed."""
    out = Path(out_dir)
    clear_earlier_run(out, options.overwrite)
    failures: list[dict] = []
    paths = collect_inputs(inputs, failures)
    landmarker = open_landmarker(bundle_dir, onnx, options.device, options.flip_test)
    heads = landmarker.heads
    dataset = options.dataset or (next(iter(heads)) if len(heads) == 1 else None)
    if dataset is None or dataset not in heads:
        raise InputError(f"choose --dataset among the model's heads: {', '.join(heads)}")
    check_flip_test(landmarker, dataset, options.flip_test, onnx)
    landmark_set = landmarker.landmark_sets[dataset]
    bounds = Bounds(landmark_set, registry.record_for(landmarker.calibration, dataset, landmarker.flip_test[dataset]))
    (out / "overlays" if options.overlays else out).mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    batch: list[Pending] = []  # the images read, not yet predicted
    seen: dict[str, Path] = {}  # id -> the first input with it
    journal = (out / JOURNAL).open("w", encoding="utf-8")

    def flush():
        points, scores = landmarker.predict([pending.prepared for pending in batch], dataset)
        for pending, pts, sc in zip(batch, points, scores, strict=True):
            path = pending.path
            if not (np.isfinite(pts).all() and np.isfinite(sc).all()):
                failures.append(failure(path, "non_finite_prediction", f"{path}: the model's heatmaps gave NaN or "
                                        "infinite landmarks or scores for this image"))
                continue
            fields, radii_px = bounds.of(pts, pending.spacing, pending.size)
            result = result_for(path, pts, sc, pending.size, pending.spacing, pending.source, dataset,
                                landmark_set.names, fields)
            journal.write(json.dumps(path.stem) + "\n")
            journal.flush()
            results.append(result)  # before its files: the summary of a stopped run lists every file it wrote
            (out / f"{path.stem}.json").write_text(json.dumps(result, indent=1))
            if pending.image is not None:
                Image.fromarray(draw_landmarks(pending.image, pred=pts, bounds=radii_px)).save(
                    out / "overlays" / f"{path.stem}.png")
        batch.clear()

    def admit(path: Path) -> Pending | None:
        """The image to predict, or None with the reason listed in failures."""
        if path.stem in seen:
            failures.append(failure(path, "duplicate_id", f"{path} has the id {path.stem!r} of {seen[path.stem]}"))
            return None
        seen[path.stem] = path
        if path.stem.lower() in RESERVED_IDS:  # .lower(): the summary files' names on a case-blind disk
            failures.append(failure(path, "reserved_id", f"{path}: the id {path.stem!r} would share its output "
                                    f"file with {path.stem.lower()}.json; rename the image"))
            return None
        try:
            image, spacing, source = read_input(path, options.spacing, options.frame)
            return Pending(path, landmarker.prepare(image), (image.shape[1], image.shape[0]), spacing, source,
                           image if options.overlays else None)
        except Rejection as exc:
            failures.append(failure(path, exc.reason, exc.detail))
        except Exception as exc:  # noqa: BLE001 - one unreadable input must not lose the others
            failures.append(failure(path, "unreadable_image", f"{path}: {type(exc).__name__}: {exc}"))
        return None

    with ended_like_ctrl_c(), journal:  # a stopped run still writes its summaries: what it predicted, what failed
        try:
            for path in paths:
                if entry := admit(path):
                    batch.append(entry)
                if len(batch) == options.batch_size:
                    flush()
            if batch:
                flush()
        finally:
            storage.write_bytes(str(out / "predictions.json"), json.dumps(
                {"dataset": dataset, "landmarks": {r["id"]: r["landmarks"] for r in results}}, indent=1).encode())
            storage.write_bytes(str(out / "failures.json"), json.dumps(failures, indent=1).encode())
            (out / JOURNAL).unlink()
    return results, failures
