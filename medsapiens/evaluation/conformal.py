"""Split conformal error bounds per landmark (numpy only).

Calibration errors e_1..e_n of one landmark on the val split (never a test split), in the
protocol's unit. Its radius is the k-th smallest with k = ceil((n + 1)(1 - alpha)). For a new
image exchangeable with the calibration images, P(error <= radius) >= 1 - alpha, and without
ties P(error <= radius) <= 1 - alpha + 1 / (n + 1) (Vovk et al. 2005; Angelopoulos & Bates 2021,
"A gentle introduction to conformal prediction", Thm. D.1). k <= n needs n >= (1 - alpha) / alpha
calibration images (9 at 90 %).
"""
from __future__ import annotations

import math

import numpy as np

from medsapiens.errors import InputError

METHOD = "split conformal"
QUANTILE = "the ceil((n + 1)(1 - alpha))-th smallest of the n calibration errors of each landmark"


def rank_of(n: int, coverage: float) -> int:
    """k of the radius among n sorted calibration errors."""
    return math.ceil((n + 1) * coverage - 1e-9)  # the tolerance keeps 0.9 * 10 from rounding up to 10


def minimum_images(coverage: float) -> int:
    n = 1
    while rank_of(n, coverage) > n:
        n += 1
    return n


class TooFewToCalibrate(InputError):
    """The calibration split has too few images, or a landmark visible in too few, for the coverage asked."""


def landmark_shortfall(mask, coverage: float, names) -> str | None:
    """Which landmarks are visible in too few calibration images for `coverage` (with their counts);
    None when every one is visible in enough."""
    counts, needed = np.asarray(mask, dtype=bool).sum(axis=0), minimum_images(coverage)
    short = [f"{name} ({int(n)})" for name, n in zip(names, counts, strict=True) if n < needed]
    if not short:
        return None
    more = f" and {len(short) - 5} more" if len(short) > 5 else ""
    return (f"landmark(s) {', '.join(short[:5])}{more} visible in too few images to calibrate at {coverage:.0%} "
            f"coverage: at least {needed} are needed")


def check_coverage(coverage: float, name: str = "--coverage") -> None:
    if not 0 < coverage < 1:
        raise InputError(f"{name} must lie strictly between 0 and 1, got {coverage}")


def radius(errors, coverage: float) -> float:
    """The conformal radius of one landmark's calibration errors (NaN entries, invisible, left out)."""
    values = np.sort(np.asarray(errors, dtype=np.float64)[np.isfinite(errors)])
    k = rank_of(len(values), coverage)
    if k > len(values):
        raise TooFewToCalibrate(f"{len(values)} calibration errors are too few for {coverage:.0%} coverage: "
                                f"at least {minimum_images(coverage)} are needed")
    return float(values[k - 1])


def calibrate(errors: np.ndarray, mask: np.ndarray, coverage: float, names, unit: str, split: str,
              flip_test: bool) -> dict:
    """The calibration record stored in a bundle for one dataset."""
    check_coverage(coverage)
    short = landmark_shortfall(mask, coverage, names)
    if short:
        raise TooFewToCalibrate(f"{split!r}: {short}")
    errors = np.where(np.asarray(mask, dtype=bool), errors, np.nan)
    counts = np.isfinite(errors).sum(axis=0)
    radii = [radius(errors[:, k], coverage) for k in range(errors.shape[1])]
    images = int(np.isfinite(errors).any(axis=1).sum())  # an image with no landmark visible sets no radius
    return {"method": METHOD, "quantile": QUANTILE, "coverage": coverage, "alpha": round(1 - coverage, 12),
            "split": split, "images": images, "n": counts.tolist(), "unit": unit, "flip_test": flip_test,
            "names": list(names), "radii": radii,
            "bound": {"lower": coverage, "upper_without_ties": [coverage + 1 / (n + 1) for n in counts.tolist()]}}


def coverage_of(errors: np.ndarray, mask: np.ndarray, radii) -> tuple[float, np.ndarray]:
    """(overall fraction of visible errors within their landmark's radius, per-landmark fractions)."""
    mask = np.asarray(mask, dtype=bool)
    inside = np.asarray(errors) <= np.asarray(radii, dtype=np.float64)[None, :]
    per_landmark = np.array([inside[mask[:, k], k].mean() if mask[:, k].any() else np.nan
                             for k in range(inside.shape[1])])
    return float(inside[mask].mean()), per_landmark


def coverage_report(errors: np.ndarray, mask: np.ndarray, calibration: dict, names, split: str) -> dict:
    """Empirical coverage on the evaluated `split`, beside the nominal level and its bounds; on the split
    the radii were calibrated on it is not held out (at least the nominal level by construction)."""
    overall, per_landmark = coverage_of(errors, mask, calibration["radii"])
    return {"nominal": calibration["coverage"], "overall": overall, "calibrated_on": calibration["split"],
            "held_out": split != calibration["split"],
            "calibration_images": calibration["images"], "calibration_shards": calibration.get("shards"),
            "unit": calibration["unit"],
            "bound": f">= {calibration['coverage']:g} (finite-sample, exchangeable images); "
                     f"<= {calibration['coverage']:g} + 1/(n+1) without ties; radius = {QUANTILE}",
            "per_landmark": {name: {"radius": r, "coverage": float(c)}
                             for name, r, c in zip(names, calibration["radii"], per_landmark, strict=True)}}


def radii_in_pixels(protocol, radii, points: np.ndarray, spacing, size) -> np.ndarray | None:
    """(K, 2) radii in original pixels along x and y, or None where the protocol cannot convert (mm
    without a spacing). The normalisations that need landmarks (the hand's wrist width) use `points`."""
    try:
        per_pixel = protocol.unit_per_pixel(points, spacing, size)
    except ValueError:
        return None
    return np.asarray(radii, dtype=np.float64)[:, None] / np.asarray(per_pixel, dtype=np.float64)[None, :]
