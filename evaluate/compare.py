"""`medsapiens evaluate --compare A/report.json B/report.json ...`: reports side by side, with a paired test.

The test is a two-sided paired sign-flip permutation test on the per-image MRE of the images both
reports scored (numpy only): under "no difference" each image's difference is as likely negative as
positive, so the observed mean difference is ranked among the means with random signs (every sign
pattern when n <= 16, else 20000 draws from a fixed seed); p = (1 + #{|mean| >= observed}) / (1 + draws).
"""
from __future__ import annotations

import math
from itertools import product
from pathlib import Path

import numpy as np

from medsapiens.errors import InputError
from medsapiens.evaluation.metrics import SPACING_RULE_LINES
from medsapiens.io import jsondoc
from medsapiens.io.record import is_finite_number, is_number

EXACT_UP_TO = 16
# Per-image MREs closer than this (in the unit: 1 micrometre, or a thousandth of a pixel) are the same
# result written two ways, e.g. `predict` rounds landmarks to 0.001 px before `evaluate --predictions`.
TIE = 1e-3
DRAWS = 20000
SEED = 0


# How reports written before the spacing rule's line named its unit described it, for mm and px sets alike
SPACING_RULE_LINE_BEFORE = "errors in original pixels times the pixel spacing (mm); pixels where no spacing is known"
REPORT_KEYS = ("mre", "mre_std_landmarks", "mre_std_images", "sdr", "per_landmark", "per_image", "unit")


def load_report(path) -> dict:
    try:
        report = jsondoc.read(path, f"report {path}")
    except FileNotFoundError:
        raise FileNotFoundError(f"report not found: {path}") from None
    missing = [k for k in REPORT_KEYS if k not in report] if isinstance(report, dict) else list(REPORT_KEYS)
    if missing:
        raise InputError(f"{path}: not an evaluation report.json (no {', '.join(missing)})")
    null_as_nan(report)
    problem = report_problem(report)
    if problem:
        raise InputError(f"{path}: {problem}")
    if report.get("protocol") == SPACING_RULE_LINE_BEFORE and report["unit"] in SPACING_RULE_LINES:
        report["protocol"] = SPACING_RULE_LINES[report["unit"]]  # the same protocol, as reports name it now
    return report


def null_as_nan(report: dict) -> None:
    """report.json writes NaN as null (an image left out, a landmark never visible); an earlier one wrote NaN."""
    if isinstance(report["per_image"], dict):
        report["per_image"] = {k: math.nan if v is None else v for k, v in report["per_image"].items()}
    if isinstance(report["per_landmark"], dict):
        for entry in report["per_landmark"].values():
            if isinstance(entry, dict) and entry.get("mre", 0) is None:
                entry["mre"] = math.nan


def report_problem(report: dict) -> str | None:
    """What makes a report.json unfit to compare, or None. NaN is allowed where evaluate writes it: the
    per-image MRE of an image left out, the MRE of a landmark never visible."""
    if not (isinstance(report["unit"], str) and isinstance(report.get("dataset"), str)):
        return f"unit and dataset must be strings, got {report['unit']!r:.40} and {report.get('dataset')!r:.40}"
    bad = [k for k in REPORT_KEYS[:3] if not is_finite_number(report[k])]
    if bad:
        return f"{', '.join(bad)} must be finite numbers"
    if not (isinstance(report["sdr"], dict) and all(map(is_finite_number, report["sdr"].values()))):
        return "sdr must map each radius to a finite percentage"
    landmarks = report["per_landmark"]
    if not (isinstance(landmarks, dict) and all(isinstance(v, dict) and is_number_or_nan(v.get("mre"))
                                                 for v in landmarks.values())):
        return "per_landmark must map each landmark name to an object with its mre, a number (NaN: never visible)"
    if not (isinstance(report["per_image"], dict) and all(map(is_number_or_nan, report["per_image"].values()))):
        return "per_image must map each image id to its MRE, a number (NaN: left out)"
    if not isinstance(report.get("scales_digest", ""), str):
        return "scales_digest must be a string"
    return None


def is_number_or_nan(value) -> bool:
    return is_number(value) and not math.isinf(value)


def sign_flip_test(differences) -> float:
    """Two-sided p-value of a mean paired difference of zero."""
    d = np.asarray(differences, dtype=np.float64)
    observed = abs(d.mean())
    if len(d) <= EXACT_UP_TO:
        signs = np.array(list(product((1.0, -1.0), repeat=len(d))))
    else:
        signs = np.random.default_rng(SEED).choice((1.0, -1.0), size=(DRAWS, len(d)))
    as_extreme = int((np.abs(signs @ d / len(d)) >= observed - 1e-12).sum())
    return as_extreme / len(signs) if len(d) <= EXACT_UP_TO else (1 + as_extreme) / (1 + len(signs))


def paired(base: dict, other: dict) -> dict:
    """The test on the images both reports scored; an image one of them left out (NaN) is counted in
    `left_out`. A difference under TIE is a tie: neither better nor worse."""
    shared = sorted(set(base["per_image"]) & set(other["per_image"]))
    scored = [i for i in shared if not (math.isnan(base["per_image"][i]) or math.isnan(other["per_image"][i]))]
    left_out = len(shared) - len(scored)
    if not scored:
        return {"images": 0, "mean_difference": None, "p": None, "left_out": left_out}
    d = np.array([other["per_image"][i] - base["per_image"][i] for i in scored])
    d[np.abs(d) < TIE] = 0.0
    return {"images": len(scored), "mean_difference": float(d.mean()), "p": sign_flip_test(d),
            "better": int((d < 0).sum()), "worse": int((d > 0).sum()), "left_out": left_out}


def comparison(paths) -> dict:
    """Every number the table prints, from the reports, and the paired tests against the first."""
    if len(paths) < 2:
        raise InputError("--compare needs at least two report.json files")
    reports = [load_report(p) for p in paths]
    for key, what in MEASURED_ALIKE:
        values = {str(r.get(key)) for r in reports}
        if len(values) > 1:
            raise InputError(f"the reports are of different {what} ({'; '.join(sorted(values))}): not comparable")
    read = {annotations_measured(r) for r in reports if "annotations" in r}
    if len(read) > 1:
        raise InputError(f"the reports were measured on shards read with other ground truth or test images "
                         f"({'; '.join(sorted(read))}): not comparable")
    refuse_other_images(paths, reports)
    if len({r["scales_digest"] for r in reports if "scales_digest" in r}) > 1:
        raise InputError("the reports converted the same images' errors with other pixel spacings (another spacing "
                         "table, or spacing option, when the shards were built): not comparable")
    units = {r["unit"] for r in reports}
    radii = list(dict.fromkeys(r for report in reports for r in report["sdr"]))
    landmarks = list(reports[0]["per_landmark"])
    return {
        "unit": units.pop(), "radii": radii, "landmarks": landmarks,
        "sdr_convention": reports[0].get("sdr_convention"),
        "rows": [{"report": str(p), "dataset": r.get("dataset"), "measured_on": measured_on(r), "images": r.get("images"),
                  "mre": r["mre"],
                  "mre_std_landmarks": r["mre_std_landmarks"], "mre_std_images": r["mre_std_images"],
                  "sdr": {k: r["sdr"].get(k) for k in radii}} for p, r in zip(paths, reports, strict=True)],
        "per_landmark": {name: [r["per_landmark"].get(name, {}).get("mre") for r in reports] for name in landmarks},
        "paired": [paired(reports[0], r) for r in reports[1:]],
    }


def refuse_other_images(paths, reports) -> None:
    """Each report's numbers are over its own images: side by side, they must be the same images."""
    first = set(reports[0]["per_image"])
    for path, report in zip(paths[1:], reports[1:], strict=True):
        images = set(report["per_image"])
        if images != first:
            only = sorted(first ^ images)
            raise InputError(f"{paths[0]} and {path} scored other images ({len(first)} and {len(images)}, "
                             f"{len(first & images)} in common; e.g. {', '.join(only[:3])} in one only): "
                             "their numbers are not comparable")


# What must be the same for two reports' numbers to be comparable at all (an earlier report may lack
# the protocol keys: absent in all of them is alike too).
MEASURED_ALIKE = (("unit", "units"), ("dataset", "datasets"), ("protocol", "protocols"),
                  ("sdr_convention", "SDR conventions"))


# reader options left out of the comparison: those that carve val only, and those naming a file (its path differs
# from one machine to another; the images a test list picks are compared as the reports' per-image ids, the
# spacings a table gives as their scales_digest)
NOT_COMPARED = ("val", "val_fraction", "val_seed", "val_list", "test_list", "spacing_csv")


def annotations_measured(report: dict) -> str:
    """The reader and the options of it that decide ground truth and test images, as text."""
    read = report["annotations"]
    if not (isinstance(read, dict) and isinstance(read.get("options"), dict)):
        return str(read)
    kept = ", ".join(f"{k}={v}" for k, v in sorted(read["options"].items()) if k not in NOT_COMPARED)
    return f"{read.get('reader')} reader" + (f" with {kept}" if kept else "")


def measured_on(report: dict) -> str:
    """The split and flip test a report was measured with, where it says (they may differ on purpose: shown)."""
    split = report.get("evaluated_on") or "n/a"
    return f"{split}, flip test" if report.get("flip_test") else split


def number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(c: dict) -> str:
    unit, radii, rows = c["unit"], c["radii"], c["rows"]
    below = "<=" if "<=" in str(c["sdr_convention"]) else "<"
    lines = ["| # | report | measured on | images | MRE (" + unit + ") | std over all errors | std of image means | "
             + " | ".join(f"SDR {below} {r} {unit} (%)" for r in radii) + " |",
             "|---:|---|---|---:|---:|---:|---:|" + "---:|" * len(radii)]
    for n, row in enumerate(rows):
        lines.append(f"| {n} | {row['report']} | {row['measured_on']} | {row['images']} | {number(row['mre'])} | "
                     f"{number(row['mre_std_landmarks'])} | {number(row['mre_std_images'])} | "
                     + " | ".join(number(row["sdr"][r], 2) for r in radii) + " |")
    lines += ["", f"Paired sign-flip permutation test on per-image MRE against #0 (two-sided; exact up to "
              f"{EXACT_UP_TO} images, else {DRAWS} draws, seed {SEED}):", "",
              "| # | shared images | mean difference (" + unit + ") | better / worse images | p |",
              "|---:|---:|---:|---|---:|"]
    for n, test in enumerate(c["paired"], start=1):
        counts = f"{test['better']} / {test['worse']}" if test["images"] else "n/a"
        lines.append(f"| {n} | {test['images']} | {number(test['mean_difference'])} | {counts} | "
                     f"{number(test['p'], 4)} |")
    notes = [f"#{n}: {test['left_out']} shared image(s) left out by one of the reports (NaN), not in the test."
             for n, test in enumerate(c["paired"], start=1) if test["left_out"]]
    lines += ["", *notes] if notes else []
    lines += ["", "Per landmark MRE (" + unit + "), delta to #0:", "",
              "| landmark | #0 | " + " | ".join(f"#{n} | delta #{n}" for n in range(1, len(rows))) + " |",
              "|---|---:|" + "---:|---:|" * (len(rows) - 1)]
    for name, values in c["per_landmark"].items():
        cells = [number(values[0])]
        for v in values[1:]:
            cells += [number(v), number(None if v is None or values[0] is None else v - values[0])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_reports(paths, out_dir=None) -> str:
    c = comparison(paths)
    text = markdown(c)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(text)
        (out / "compare.json").write_text(jsondoc.dumps(c) + "\n")
    return text
