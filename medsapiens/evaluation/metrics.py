"""Landmark errors by each dataset's evaluation protocol: radial error, MRE, SDR.

All errors are measured in ORIGINAL image pixels and converted to the protocol's unit with a
per-image, per-axis factor: the pixel spacing (mm), the hand's wrist-width normalisation
(50 mm over two landmarks), or the chest's 512x512 frame (px).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from medsapiens.errors import InputError
from medsapiens.io.record import is_positive_pair
from medsapiens.io.registry import LandmarkSet

# An error exactly at a radius comes out a rounding away from it ((18, 24) px at 0.1 mm is 3.0000000000000004
# mm): within this relative tie it counts as on the radius, which "<" leaves out and "<=" takes in.
SDR_TIE = 1e-9
SDR_CONVENTIONS = {"<": lambda errors, r: errors < r * (1 - SDR_TIE),
                   "<=": lambda errors, r: errors <= r * (1 + SDR_TIE)}
SPACING_RULE_LINES = {"mm": "errors in original pixels times the pixel spacing, in mm",
                      "px": "errors in original pixels (this set is measured in pixels: no pixel spacing applied)"}


@dataclass(frozen=True)
class Protocol:
    """How one dataset's errors are measured (derived from its LandmarkSet, optionally overridden)."""

    landmark_set: LandmarkSet
    wrist_landmarks: tuple[int, int] | None = None
    sdr_convention: str = "<"

    @property
    def rule(self) -> str:
        norm = self.landmark_set.normalization
        return norm["rule"] if norm else "spacing"

    @property
    def wrist_pair(self) -> tuple[int, int]:
        """The two landmarks whose distance scales the hand protocol's errors."""
        a, b = self.wrist_landmarks or self.landmark_set.normalization["landmarks"]
        return a, b

    def scales_like_the_default(self) -> bool:
        """Whether errors come out as with the set's own rule (a hand's wrist pair given in either order)."""
        return self.rule != "wrist_width" or set(self.wrist_pair) == set(self.landmark_set.normalization["landmarks"])

    @property
    def unit(self) -> str:
        return self.landmark_set.unit

    def description(self) -> str:
        norm = self.landmark_set.normalization or {}
        if self.rule == "wrist_width":
            a, b = self.wrist_pair
            return f"errors scaled by {norm['mm']} mm / ||gt[{a}] - gt[{b}]|| (wrist width), in mm"
        if self.rule == "frame":
            w, h = norm["size"]
            return f"errors in pixels of the image resized to {w}x{h}"
        return SPACING_RULE_LINES[self.unit]

    def unscalable_images(self, visible: np.ndarray, ids: list[str]) -> dict[str, str]:
        """Images whose errors this protocol cannot scale (hand: a wrist landmark invisible, its position
        meaningless), with the reason: their landmarks are left out of the scores and counted, never
        measured in a wrong unit."""
        if self.rule != "wrist_width":
            return {}
        a, b = self.wrist_pair
        return {ids[n]: f"wrist landmark {a if not visible[n, a] else b} invisible: the {self.landmark_set.id} "
                "protocol cannot scale its errors" for n in np.flatnonzero(~(visible[:, a] & visible[:, b]))}

    def unit_per_pixel(self, gt_orig: np.ndarray, spacing_orig, orig_size, image_id: str = "?") -> np.ndarray:
        """(sx, sy): protocol units per original pixel for one image."""
        norm = self.landmark_set.normalization or {}
        if self.rule == "wrist_width":
            a, b = self.wrist_pair
            width = float(np.linalg.norm(np.asarray(gt_orig[a], np.float64) - np.asarray(gt_orig[b], np.float64)))
            if not np.isfinite(width):
                raise InputError(f"image {image_id}: wrist landmark {a} or {b} is invisible, cannot normalise its errors")
            if width <= 0:
                raise InputError(f"image {image_id}: wrist landmarks {a} and {b} coincide, cannot normalise its errors")
            return np.full(2, norm["mm"] / width)
        if self.rule == "frame":
            fw, fh = norm["size"]
            return np.array([fw / orig_size[0], fh / orig_size[1]], dtype=np.float64)
        if self.unit == "px":  # a pixel-measured set stays in pixels even where some images have a spacing
            return np.ones(2)
        if spacing_orig is None:
            raise InputError(f"image {image_id}: dataset {self.landmark_set.id!r} is measured in mm but the "
                             "image has no pixel spacing")
        if not is_positive_pair(spacing_orig):
            raise InputError(f"image {image_id}: pixel spacing {spacing_orig!r:.100} must be two positive finite "
                             "numbers (mm per pixel, x then y)")
        return np.asarray(spacing_orig, dtype=np.float64)


def radial_errors(pred_orig, gt_orig, unit_per_pixel) -> np.ndarray:
    """(N, K) errors: || (pred - gt) * (sx, sy) || per landmark, with one (sx, sy) per image."""
    diff = (np.asarray(pred_orig, np.float64) - np.asarray(gt_orig, np.float64)) * np.asarray(unit_per_pixel)[:, None, :]
    return np.linalg.norm(diff, axis=-1)


def scales_digest(ids, unit_per_pixel) -> str:
    """A digest of how each image's errors were converted to the unit: its (sx, sy) to 6 significant digits.
    Two reports of the same images and ground truth with different digests used different pixel spacings."""
    pairs = sorted(zip(ids, unit_per_pixel, strict=True), key=lambda pair: pair[0])
    text = ";".join(f"{i}:{sx:.6g},{sy:.6g}" for i, (sx, sy) in pairs)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


WORST_IMAGES = 10  # listed by name in a report


def summarize(errors: np.ndarray, radii, convention: str = "<", mask: np.ndarray | None = None,
              names=None, image_ids=None) -> dict:
    """MRE (+ both stds), SDR per radius, per-landmark tables and the worst images.

    `mre_std_images` is the std of per-image mean errors (MedSapiens' printed +-), and
    `mre_std_landmarks` the std over all (image, landmark) errors.
    """
    errors = np.asarray(errors, dtype=np.float64)
    mask = np.ones_like(errors, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    below = SDR_CONVENTIONS[convention]
    flat = errors[mask]
    if not len(flat):
        raise InputError("no visible landmark to measure")
    if not np.isfinite(flat).all():
        bad = [image_ids[i] if image_ids is not None else str(i) for i in np.nonzero(~np.isfinite(errors) & mask)[0]]
        raise InputError(f"non-finite errors on image(s) {sorted(set(map(str, bad)))[:5]}: the predictions "
                         "are not finite numbers (a diverged model?)")
    per_image = np.array([row[m].mean() if m.any() else np.nan for row, m in zip(errors, mask, strict=True)])

    def sdr(values) -> dict:
        return {f"{r:g}": float(100.0 * below(values, r).mean()) if len(values) else float("nan") for r in radii}

    names = list(names) if names is not None else [str(k) for k in range(errors.shape[1])]
    image_ids = list(image_ids) if image_ids is not None else [str(i) for i in range(len(errors))]
    scored = np.flatnonzero(~np.isnan(per_image))  # an image left out has no MRE to rank
    order = scored[np.argsort(-per_image[scored], kind="stable")][:WORST_IMAGES]
    return {
        "images": int(len(errors)),
        "landmarks": int(mask.sum()),
        "mre": float(flat.mean()),
        "mre_std_landmarks": float(flat.std()),
        "mre_std_images": float(np.nanstd(per_image)),
        "sdr": sdr(flat),
        "per_landmark": {
            name: {"mre": float(errors[mask[:, k], k].mean()) if mask[:, k].any() else float("nan"),
                   "sdr": sdr(errors[mask[:, k], k])}
            for k, name in enumerate(names)
        },
        "worst": [{"id": image_ids[i], "mre": float(per_image[i])} for i in order],
        "per_image": {image_ids[i]: float(per_image[i]) for i in range(len(errors))},
    }
