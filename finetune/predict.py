"""`medsapiens predict`: landmarks on new images (PNG, JPG, BMP, TIFF, DICOM) from a bundle.

Writes one JSON per image (pixels of the original image; millimetres too when the spacing is
known: `--spacing` wins, else the DICOM tags), `predictions.json` in the format `medsapiens evaluate
--predictions` reads, optional overlays, and `failures.json` listing every input that could not
be read, with the reason. Each input is isolated: one bad file is listed, the others complete, and
both JSON files are always written.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medsapiens import bundle as bundlelib
from medsapiens.data.pipeline import eval_example
from medsapiens.errors import InputError
from medsapiens.imageio import decode, dicom_spacing, is_dicom, to_float
from medsapiens.inference import heatmaps_to_image, predict_heatmaps
from medsapiens.record import Rejection
from medsapiens.visualize import draw_landmarks

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"}


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Files as given and image files found under folders (sorted)."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if is_image_file(p))
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(inputs)}")
    return paths


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


def result_for(path: Path, points: np.ndarray, scores: np.ndarray, image, spacing, source, dataset, names) -> dict:
    result = {
        "image": str(path), "id": path.stem, "dataset": dataset, "size": [image.shape[1], image.shape[0]],
        "names": list(names), "landmarks": np.round(points, 3).tolist(), "scores": np.round(scores, 4).tolist(),
        "spacing_mm": list(spacing) if spacing else None, "spacing_source": source,
    }
    if spacing:
        result["landmarks_mm"] = np.round(points * np.asarray(spacing), 3).tolist()
    return result


def predict(bundle_dir, inputs: list[str], out_dir, dataset: str | None = None, flip_test: bool = False,
            overlays: bool = False, batch_size: int = 8, spacing=None, device: str = "cpu", frame: int | None = None):
    """Returns (results, failures). Ids are file stems; a second input with the same id is a failure."""
    paths = collect_inputs(inputs)
    model, bundle = bundlelib.load(bundle_dir, device)
    dataset = dataset or (next(iter(bundle.heads)) if len(bundle.heads) == 1 else None)
    if dataset not in bundle.heads:
        raise InputError(f"choose --dataset among the bundle's heads: {', '.join(bundle.heads)}")
    landmark_set = bundle.landmark_sets[dataset]
    perm = landmark_set.flip_permutation() if flip_test and landmark_set.can_flip else None
    out = Path(out_dir)
    (out / "overlays" if overlays else out).mkdir(parents=True, exist_ok=True)
    results, failures, batch, seen = [], [], [], {}

    def flush():
        images = torch.stack([e.image for _, _, e, _, _ in batch]).to(device)
        heat = predict_heatmaps(model, images, dataset, model.dataset_ids.index(dataset), perm)
        points, scores = heatmaps_to_image(heat, torch.stack([e.matrix for _, _, e, _, _ in batch]), bundle.input_size,
                                           bundle.codec.blur_kernel)
        for (path, image, example, sp, source), pts, sc in zip(batch, points, scores):
            result = result_for(path, pts, sc, image, sp, source, dataset, landmark_set.names)
            (out / f"{path.stem}.json").write_text(json.dumps(result, indent=1))
            if overlays:
                Image.fromarray(draw_landmarks(image, pred=pts)).save(out / "overlays" / f"{path.stem}.png")
            results.append(result)
        batch.clear()

    try:
        for path in paths:
            if path.stem in seen:
                failures.append(failure(path, "duplicate_id", f"{path} has the id {path.stem!r} of {seen[path.stem]}"))
                continue
            seen[path.stem] = path
            try:
                image, sp, source = read_input(path, spacing, frame)
            except Rejection as exc:
                failures.append(failure(path, exc.reason, exc.detail))
                continue
            except Exception as exc:  # noqa: BLE001 - one unreadable input must not lose the others
                failures.append(failure(path, "unreadable_image", f"{path}: {type(exc).__name__}: {exc}"))
                continue
            batch.append((path, image, eval_example(image, {}, bundle.input_size, bundle.codec.margin), sp, source))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        (out / "predictions.json").write_text(json.dumps(
            {"dataset": dataset, "landmarks": {r["id"]: r["landmarks"] for r in results}}, indent=1))
        (out / "failures.json").write_text(json.dumps(failures, indent=1))
    return results, failures
