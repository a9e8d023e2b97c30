"""Aariz cephalometric dataset (`aariz`): 29 landmarks by a junior and a senior orthodontist.

    {train,valid,test}/Cephalograms/<id>.(png|jpg|jpeg)          (folder names in any case)
    {train,valid,test}/Annotations/Cephalometric Landmarks/
        Senior Orthodontists/<id>.json, Junior Orthodontists/<id>.json
            {"landmarks": [{"title": ..., "value": {"x": ..., "y": ...}}, ...]}

Ground truth is the mean of the two annotators, landmark by landmark: paired by `title` where both
files title every landmark, by position where neither does (one titled, one not: rejected). Split
folder `valid` becomes `val`. Spacing is per device, from the `cephalogram_machine_mappings.csv` the
dataset ships (cephalogram_id, machine, pixel_size), or from option `spacing_csv`: a CSV with an id
column (cephalogram_id, image_id, ceph_id, id or file) and a mm-per-pixel column (pixel_size,
spacing or pixel_spacing); without either the samples carry no spacing. A short row, or an id given
two different values, stops the source in one line naming the row; an image without a row, or with a
value that is not a positive number, is rejected (`bad_spacing`).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from medsapiens.io.record import Rejection
from medsapiens.shards.readers import (
    BAD_INPUT,
    RawSample,
    ReaderError,
    Rejected,
    first_existing,
    optional_path,
    point_list,
    read_json,
    read_text,
    rejected,
)

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


def read_spacing_table(path: Path | None) -> dict[str, str] | None:
    """{image id: mm per pixel as written}; a short row, or an id given two different values, is one
    line naming the file and the row."""
    if path is None:
        return None
    rows = csv.DictReader(read_text(path).splitlines())
    columns = {c.strip().lower(): c for c in rows.fieldnames or []}
    id_col = next((columns[c] for c in ID_COLUMNS if c in columns), None)
    mm_col = next((columns[c] for c in SPACING_COLUMNS if c in columns), None)
    if id_col is None or mm_col is None:
        raise ReaderError(f"{path}: needs an id column ({', '.join(ID_COLUMNS)}) and a spacing column "
                          f"({', '.join(SPACING_COLUMNS)}); has {', '.join(columns) or 'no header'}")
    table: dict[str, str] = {}
    lines: dict[str, int] = {}
    for row in rows:
        if row[id_col] is None or row[mm_col] is None:
            raise ReaderError(f"{path} line {rows.line_num} is short: {len(row) - list(row.values()).count(None)} "
                              f"of the header's {len(columns)} columns")
        image_id, mm = Path(row[id_col].strip()).stem, row[mm_col].strip()
        if image_id in table and as_number(table[image_id]) != as_number(mm):
            raise ReaderError(f"{path}: id {image_id!r} has spacing {table[image_id]!r} at line {lines[image_id]} "
                              f"and {mm!r} at line {rows.line_num}")
        table[image_id], lines[image_id] = mm, rows.line_num
    return table


def as_number(text: str) -> float | str:
    """The number a table cell holds (so that 0.1 and 0.10 agree), else the text itself."""
    try:
        return float(text)
    except ValueError:
        return text


def table_spacing(image_id: str, table: dict[str, str] | None, path: Path | None) -> tuple[float, float] | None:
    """(mm, mm) from the spacing table, None without a table; a missing row or a value that is not a
    positive number is a bad_spacing Rejection."""
    if table is None:
        return None
    if image_id not in table:
        raise Rejection("bad_spacing", f"no row for {image_id} in {path}")
    mm = as_number(table[image_id])
    if not (isinstance(mm, float) and math.isfinite(mm) and mm > 0):
        raise Rejection("bad_spacing", f"spacing {table[image_id]!r} for {image_id} in {path} is not a positive number")
    return mm, mm


def read_points(path: Path) -> tuple[list[str] | None, tuple[tuple[float, float], ...]]:
    """(titles, points) in file order; titles None unless every landmark has a title of its own."""
    marks = read_json(path)["landmarks"]
    points = point_list([[m["value"]["x"], m["value"]["y"]] for m in marks], "landmark values' x and y")
    titles = [m.get("title") for m in marks]
    titled = all(isinstance(t, str) and t for t in titles) and len(set(titles)) == len(titles)
    return (titles if titled else None), points


def mean_of_annotators(senior: tuple, junior: tuple) -> tuple:
    """The mean of the two annotators' (titles, points), landmark by landmark: paired by title where
    both files title every landmark (in the senior's order), by position where neither does."""
    (senior_titles, senior_points), (junior_titles, junior_points) = senior, junior
    if bool(senior_titles) != bool(junior_titles):
        raise ValueError(f"only the {'senior' if senior_titles else 'junior'} annotator titles every landmark (once): "
                         "the two cannot be paired landmark by landmark")
    if senior_titles and junior_titles:
        if set(senior_titles) != set(junior_titles):
            raise ValueError(f"the annotators title different landmarks: {sorted(set(senior_titles) ^ set(junior_titles))[:6]}")
        by_title = dict(zip(junior_titles, junior_points, strict=True))
        junior_points = [by_title[title] for title in senior_titles]
    if len(senior_points) != len(junior_points):
        raise ValueError(f"senior has {len(senior_points)} landmarks, junior {len(junior_points)}")
    return tuple(((a[0] + b[0]) / 2, (a[1] + b[1]) / 2) for a, b in zip(senior_points, junior_points, strict=True))


def scan_split(folder: Path, split: str, table: dict[str, str] | None, table_path: Path | None):
    images = child(folder, "Cephalograms")
    notes = child(child(folder, "Annotations"), "Cephalometric Landmarks")
    ids = {p.stem for p in images.glob("*") if p.suffix in IMAGE_SUFFIXES}
    ids |= {p.stem for who in ANNOTATORS for p in child(notes, who).glob("*.json")}
    for image_id in sorted(ids):
        paths = [child(notes, who) / f"{image_id}.json" for who in ANNOTATORS]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            yield Rejected(image_id, str(missing[0]), "missing_annotation", f"no annotation file {missing[0]}", split)
            continue
        try:
            marks = []
            for where in paths:  # named by a rejection: the file at fault
                marks.append(read_points(where))
            where = paths[0]  # the senior's, for the pair and the table
            points = mean_of_annotators(*marks)
            spacing = table_spacing(image_id, table, table_path)
        except BAD_INPUT as exc:
            yield rejected(image_id, where, exc, split=split)
            continue
        image = first_existing(images / f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES)
        yield RawSample(image_id, split, str(image), points, spacing_mm=spacing,
                        spacing_from="spacing_csv" if spacing else "none")


def scan(root: Path, options: dict):
    table_path = optional_path(root, options, "spacing_csv", SHIPPED_SPACING_TABLE)
    table = read_spacing_table(table_path)
    folders = [child(root, name) for name in SPLITS]
    if not any(f.is_dir() for f in folders):
        raise ReaderError(f"{root}: no train/valid/test folder of the Aariz layout")
    for name, folder in zip(SPLITS, folders, strict=True):
        yield from scan_split(folder, SPLITS[name], table, table_path)
