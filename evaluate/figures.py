"""Figures beside report.md: the cumulative error distribution (CED) and per-landmark MRE bars (matplotlib)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

CED = "ced.png"
PER_LANDMARK = "per_landmark_mre.png"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def ced_curve(errors) -> tuple[np.ndarray, np.ndarray]:
    """(sorted finite errors, fraction of errors <= each): the empirical cumulative distribution."""
    values = np.sort(np.asarray(errors, dtype=np.float64).ravel())
    values = values[np.isfinite(values)]
    return values, np.arange(1, len(values) + 1) / max(len(values), 1)


def ced_figure(curves: dict[str, np.ndarray], unit: str, radii, path, title: str) -> Path:
    """One curve per entry (label -> errors) in one figure, the SDR radii marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    largest = max((np.nanpercentile(e, 99) for e in curves.values() if np.isfinite(e).any()), default=1.0)
    for label, errors in curves.items():
        x, y = ced_curve(errors)
        ax.step(np.concatenate([[0.0], x]), np.concatenate([[0.0], y]), where="post", label=f"{label} (n={len(x)})")
    for r in radii:
        ax.axvline(float(r), color="grey", linestyle="--", linewidth=0.8)
        ax.text(float(r), 0.02, f" {r:g}", color="grey", fontsize=8)
    ax.set_xlim(0, max(largest, max(map(float, radii), default=0.0)) * 1.05)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(f"radius r ({unit})")
    ax.set_ylabel("fraction of landmarks with error <= r")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save(fig, path)


def per_landmark_figure(report: dict, path) -> Path:
    """MRE per landmark as bars, the overall MRE as a line."""
    plt = pyplot()
    names = list(report["per_landmark"])
    values = [report["per_landmark"][n]["mre"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.28 * len(names) + 1.5), 4.0), dpi=110)
    ax.bar(range(len(names)), values, color="#4c72b0")
    ax.axhline(report["mre"], color="#c44e52", linewidth=1, label=f"MRE {report['mre']:.3f} {report['unit']}")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel(f"MRE ({report['unit']})")
    ax.set_title(f"{report['dataset']}: mean radial error per landmark ({report['images']} images)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def save(fig, path) -> Path:
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    pyplot().close(fig)
    return path


def report_figures(report: dict, errors: np.ndarray, out_dir) -> list[Path]:
    """The two figures of one report, written beside it."""
    out = Path(out_dir)
    title = f"{report['dataset']}: cumulative error distribution"
    radii = [float(r) for r in report["sdr"]]
    return [ced_figure({report["dataset"]: errors}, report["unit"], radii, out / CED, title),
            per_landmark_figure(report, out / PER_LANDMARK)]


def errors_from_csv(path) -> np.ndarray:
    """(N, K) errors of a report's per_image.csv (NaN where the ground truth has no landmark)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]  # ids may hold commas, quoted
    return np.array([[float(v) for v in row[2:]] for row in rows if row], dtype=np.float64)


def runs_ced_figure(starts: dict[str, list], unit: str, radii, path, title: str) -> Path:
    """One CED curve per start, pooling the errors of its runs' evaluations (lists of per_image.csv files)."""
    curves = {label: np.concatenate([errors_from_csv(p).ravel() for p in files]) for label, files in starts.items()}
    return ced_figure(curves, unit, radii, path, title)
