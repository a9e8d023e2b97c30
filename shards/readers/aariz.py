"""Aariz cephalometric dataset (`aariz`): 29 landmarks by a junior and a senior orthodontist.

    {train,valid,test}/Cephalograms/<id>.(png|jpg|jpeg)          (folder names in any case)
    {train,valid,test}/Annotations/Cephalometric Landmarks/
        Senior Orthodontists/<id>.json, Junior Orthodontists/<id>.json
            {"landmarks": [{"title": ..., "value": {"x": ..., "y": ...}}, ...]}

Ground truth is the mean of the two annotators. Split folder `valid` becomes `val`. Spacing is
per device, from the `cephalogram_machine_mappings.csv` the dataset ships (cephalogram_id,
machine, pixel_size), or from option `spacing_csv`: a CSV with an id column (cephalogram_id,
image_id, ceph_id, id or file) and a mm-per-pixel column (pixel_size, spacing or pixel_spacing);
without either the samples carry no spacing.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from medsapiens.shards.readers import RawSample, ReaderError, Rejected, first_existing, optional_path, read_text

OPTIONS = {"spacing_csv": None}
SPLIT_RULE = "the dataset's folders: train -> train, valid -> val, test -> test"
LANDMARK_SET = "aariz"
SPLITS = {"train": "train", "valid": "val", "test": "test"}
ANNOTATORS = ("Senior Orthodontists", "Junior Orthodontists")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")
ID_COLUMNS = ("cephalogram_id", "image_id", "ceph_id", "id", "file")
SHIPPED_SPACING_TABLE = "cephalogram_machine_mappings.csv"  # per image: cephalogram_id, machine, pixel_size
SPACING_COLUMNS = ("pixel_size", "spacing", "pixel_spacing")


def child(folder: Path, name: str) -> Path:
    """folder/name, matching the name in any letter case."""
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.lower() == name.lower():
                return entry
    return folder / name


def read_spacing_table(path: Path | None) -> dict[str, float] | None:
    if path is None:
        return None
    rows = list(csv.DictReader(read_text(path).splitlines()))
    columns = {c.strip().lower(): c for c in (rows[0].keys() if rows else [])}
    id_col = next((columns[c] for c in ID_COLUMNS if c in columns), None)
    mm_col = next((columns[c] for c in SPACING_COLUMNS if c in columns), None)
    if id_col is None or mm_col is None:
        raise ReaderError(f"{path}: needs an id column ({', '.join(ID_COLUMNS)}) and a spacing column "
                          f"({', '.join(SPACING_COLUMNS)}); has {', '.join(columns) or 'no header'}")
    return {Path(row[id_col].strip()).stem: row[mm_col] for row in rows}


def read_points(path: Path) -> list[tuple[float, float]]:
    data = json.loads(read_text(path))
    return [(float(m["value"]["x"]), float(m["value"]["y"])) for m in data["landmarks"]]


def scan_split(folder: Path, split: str, spacing: dict | None):
    images = child(folder, "Cephalograms")
    notes = child(child(folder, "Annotations"), "Cephalometric Landmarks")
    ids = {p.stem for p in images.glob("*") if p.suffix in IMAGE_SUFFIXES}
    ids |= {p.stem for who in ANNOTATORS for p in child(notes, who).glob("*.json")}
    for image_id in sorted(ids):
        paths = [child(notes, who) / f"{image_id}.json" for who in ANNOTATORS]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            yield Rejected(image_id, str(missing[0]), "missing_annotation", f"no annotation file {missing[0]}")
            continue
        try:
            senior, junior = (read_points(p) for p in paths)
            if len(senior) != len(junior):
                raise ValueError(f"senior has {len(senior)} landmarks, junior {len(junior)}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            yield Rejected(image_id, str(paths[0]), "bad_annotation", f"{paths[0]}: {exc!r}")
            continue
        points = tuple(((a[0] + b[0]) / 2, (a[1] + b[1]) / 2) for a, b in zip(senior, junior, strict=True))
        mm = None if spacing is None else spacing.get(image_id)
        if spacing is not None and mm is None:
            yield Rejected(image_id, str(paths[0]), "bad_spacing", f"no row for {image_id} in the spacing CSV")
            continue
        try:
            pair = None if mm is None else (float(mm), float(mm))
        except ValueError:
            yield Rejected(image_id, str(paths[0]), "bad_spacing", f"spacing {mm!r} for {image_id} is not a number")
            continue
        image = first_existing(images / f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES)
        yield RawSample(image_id, split, str(image), points, spacing_mm=pair,
                        spacing_from="spacing_csv" if pair else "none")


def scan(root: Path, options: dict):
    spacing = read_spacing_table(optional_path(root, options, "spacing_csv", SHIPPED_SPACING_TABLE))
    folders = [child(root, name) for name in SPLITS]
    if not any(f.is_dir() for f in folders):
        raise ReaderError(f"{root}: no train/valid/test folder of the Aariz layout")
    for name, folder in zip(SPLITS, folders, strict=True):
        yield from scan_split(folder, SPLITS[name], spacing)
