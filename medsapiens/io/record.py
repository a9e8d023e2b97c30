"""The shard record: the contract between `shards` (writer) and every reader of shards.

One sample = `<key>.png` (the stored image, lossless) + `<key>.json` (this module's fields).
Coordinates are pixel positions with pixel centres on integers, in the stored image. The stored
image is the original resized by `scale` = stored size / original size (per axis), so a position
maps as  x_stored = (x_orig + 0.5) * scale_x - 0.5  (edges of the image stay aligned).
"""
from __future__ import annotations

import math
import re

import numpy as np

from medsapiens.errors import UserError

FIELDS = (
    "dataset", "split", "source_id", "landmarks", "visible", "spacing_mm", "normalization",
    "orig_size", "scale", "names",
)
MAX_IMAGE_SIDE = 20000
MAX_COORDINATE = 10 * MAX_IMAGE_SIDE  # a landmark this far off any image is a broken record, not "outside"
MIN_IMAGE_SIDE = 16


class Rejection(UserError):
    """A sample that cannot be written, with a short machine-readable reason and a human detail."""

    REASONS = (
        "unreadable_image", "truncated_image", "missing_image", "missing_annotation",
        "bad_annotation", "wrong_landmark_count", "non_finite_landmarks", "landmark_outside_image",
        "duplicate_id", "bad_spacing", "absurd_image_size", "multi_frame",
    )

    def __init__(self, reason: str, detail: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; known: {', '.join(self.REASONS)}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def safe_name(source_id) -> str:
    """An id with every character outside [A-Za-z0-9-] made '-': usable in keys and file names."""
    return re.sub(r"[^A-Za-z0-9-]", "-", str(source_id))


def sample_key(dataset: str, split: str, source_id: str) -> str:
    """`<dataset>_<split>_<safe id>`.

    WebDataset takes everything after the first dot of a member name as its extension, so a key
    must have no dots; distinct ids that collide here are caught as duplicates by the writer.
    """
    return f"{dataset}_{split}_{safe_name(source_id)}"


def resized_size(orig_size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = orig_size
    factor = min(1.0, max_side / max(w, h))
    return max(1, round(w * factor)), max(1, round(h * factor))


def to_stored(points, scale) -> np.ndarray:
    return (np.asarray(points, dtype=np.float64) + 0.5) * np.asarray(scale, dtype=np.float64) - 0.5


def to_original(points, scale) -> np.ndarray:
    return (np.asarray(points, dtype=np.float64) + 0.5) / np.asarray(scale, dtype=np.float64) - 0.5


def original_spacing(meta: dict):
    """mm per original pixel as (sx, sy), or None."""
    if meta.get("spacing_mm") is None:
        return None
    return tuple(s * c for s, c in zip(meta["spacing_mm"], meta["scale"], strict=True))


def check_image_size(width: int, height: int) -> None:
    if not (MIN_IMAGE_SIDE <= width <= MAX_IMAGE_SIDE and MIN_IMAGE_SIDE <= height <= MAX_IMAGE_SIDE):
        raise Rejection(
            "absurd_image_size",
            f"{width}x{height} px, expected each side in {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE}",
        )


def check_landmarks(landmarks, visible, num_landmarks: int, size, outside: str = "reject"):
    """Validate landmarks against K and the image size (W, H); return the (possibly updated) visibility.

    outside="reject" rejects a landmark outside the image, "invisible" keeps the sample and marks it
    invisible (its position is kept, clipped to nothing).
    """
    try:
        pts = np.asarray(landmarks, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise Rejection("bad_annotation", f"landmarks must be a list of [x, y], got {landmarks!r:.80}") from None
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise Rejection("bad_annotation", f"landmarks must be a list of [x, y], got shape {pts.shape}")
    if len(pts) != num_landmarks:
        raise Rejection("wrong_landmark_count", f"{len(pts)} landmarks, expected {num_landmarks}")
    if not np.isfinite(pts).all():
        bad = sorted({int(i) for i in np.nonzero(~np.isfinite(pts))[0]})
        raise Rejection("non_finite_landmarks", f"NaN or inf at landmark(s) {bad}")
    far = np.abs(pts).max(axis=1) > MAX_COORDINATE
    if far.any():
        raise Rejection("bad_annotation", f"landmark(s) {np.nonzero(far)[0][:5].tolist()} at coordinates beyond "
                        f"{MAX_COORDINATE} px, no image's")
    try:
        vis = np.ones(num_landmarks, dtype=np.int64) if visible is None else np.asarray(visible, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise Rejection("bad_annotation", f"visibility flags must be whole numbers, got {visible!r:.80}") from None
    if vis.shape != (num_landmarks,):
        raise Rejection("bad_annotation", f"{vis.shape[0] if vis.ndim else 0} visibility flags for {num_landmarks} landmarks")
    w, h = size
    out = (pts[:, 0] < -0.5) | (pts[:, 0] > w - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > h - 0.5)
    out &= vis > 0
    if out.any():
        if outside == "reject":
            where = ", ".join(f"{i}=({pts[i, 0]:.1f}, {pts[i, 1]:.1f})" for i in np.nonzero(out)[0][:5])
            raise Rejection("landmark_outside_image", f"landmark(s) {where} outside the {w}x{h} image")
        vis = np.where(out, 0, vis)
    return vis


def is_positive_pair(value) -> bool:
    """Two positive finite numbers (a spacing in mm per pixel, a size, a scale): a list, tuple or array
    of exactly two numbers, never a string, a bool or a nested list."""
    return (isinstance(value, (list, tuple, np.ndarray)) and len(value) == 2
            and all(is_finite_number(v) and v > 0 for v in value))


def check_spacing(spacing) -> None:
    if spacing is not None and not is_positive_pair(spacing):
        raise Rejection("bad_spacing", f"pixel spacing must be two positive numbers, got {spacing!r:.100}")


def make_record(*, dataset, split, source_id, landmarks_orig, visible, spacing_orig, normalization,
                orig_size, stored_size, names) -> dict:
    """The JSON half of a shard sample; positions and spacing converted to the stored image."""
    scale = [stored_size[0] / orig_size[0], stored_size[1] / orig_size[1]]
    return {
        "dataset": dataset,
        "split": split,
        "source_id": str(source_id),
        "landmarks": [[round(float(x), 4), round(float(y), 4)] for x, y in to_stored(landmarks_orig, scale)],
        "visible": [int(v) for v in visible],
        "spacing_mm": None if spacing_orig is None else [spacing_orig[0] / scale[0], spacing_orig[1] / scale[1]],
        "normalization": normalization,
        "orig_size": [int(orig_size[0]), int(orig_size[1])],
        "scale": scale,
        "names": list(names),
    }


def validate_record(meta: dict, stored_size, num_landmarks: int | None = None) -> list[int]:
    """Check a record read back from a shard (a reader's defence against foreign or damaged shards);
    returns its visibility with landmarks outside the image marked invisible."""
    if not isinstance(meta, dict):
        raise Rejection("bad_annotation", f"the record is not a JSON object: {meta!r:.80}")
    missing = [f for f in FIELDS if f not in meta]
    if missing:
        raise Rejection("bad_annotation", f"record lacks field(s) {missing}")
    for name in ("dataset", "split", "source_id"):
        if not isinstance(meta[name], str):
            raise Rejection("bad_annotation", f"{name} must be a string, got {meta[name]!r}")
    check_size_and_scale(meta["orig_size"], meta["scale"], stored_size)
    k = num_landmarks if num_landmarks is not None else len(meta["names"])
    if not isinstance(meta["names"], list) or len(meta["names"]) != k:
        raise Rejection("bad_annotation", f"names must list the {k} landmarks, got {meta['names']!r:.80}")
    if not isinstance(meta["visible"], list) or any(v not in (0, 1) for v in meta["visible"]):
        raise Rejection("bad_annotation", f"visible must be a list of 0 and 1, got {meta['visible']!r:.80}")
    if not is_point_list(meta["landmarks"]):
        raise Rejection("bad_annotation", f"landmarks must be a list of [x, y] number pairs, got "
                        f"{meta['landmarks']!r:.80}")
    visible = check_landmarks(meta["landmarks"], meta["visible"], k, stored_size, outside="invisible")
    check_spacing(meta["spacing_mm"])
    return [int(v) for v in visible]


def is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A number a float holds, finite (an int past a float's range is not)."""
    try:
        return is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def is_whole(value) -> bool:
    """An int, never a bool (to Python, True is 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_point_list(value) -> bool:
    """A JSON list of [x, y] lists of numbers (no strings, bools or ragged entries)."""
    return isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 and all(map(is_number, p))
                                           for p in value)


def pair_of_numbers(value, name: str) -> tuple[float, float]:
    if not (isinstance(value, list) and is_positive_pair(value)):
        raise Rejection("bad_annotation", f"{name} must be two positive numbers, got {value!r:.80}")
    return float(value[0]), float(value[1])


def check_size_and_scale(orig_size, scale, stored_size) -> None:
    """orig_size a plausible image size, scale positive, and stored size = orig_size x scale (to a pixel)."""
    w, h = pair_of_numbers(orig_size, "orig_size")
    if w != int(w) or h != int(h):
        raise Rejection("bad_annotation", f"orig_size must be whole pixels, got {orig_size}")
    check_image_size(int(w), int(h))
    sx, sy = pair_of_numbers(scale, "scale")
    if abs(w * sx - stored_size[0]) > 1 or abs(h * sy - stored_size[1]) > 1:
        raise Rejection("bad_annotation", f"orig_size {orig_size} x scale {scale} does not give the stored "
                        f"image's {stored_size[0]}x{stored_size[1]} px")
