"""Digital Hand Atlas with Payer's 37 landmarks (`hand`).

    jpg/<image_id>.jpg
    all.csv    rows `image_id,x0,y0,...,x36,y36` (float pixels), no header, no quoting (or
               labels/all.csv, where some copies of GU2Net's loader read it)

Only the images with a row are inputs: the atlas' other JPGs are counted as unlabelled, and a row
whose JPG is missing is rejected. No official split: `split=gu2net` (default, GU2Net's, Zhu et al.
MICCAI 2021) takes the ids that have both a row and a JPG in natural order, as its loader does: 550
train, 59 val, the rest test (with fewer than 610 images the test split is empty: the build summary
warns); `split=seeded` shuffles the same ids, sorted, with `seed` and takes
`test_fraction`, then `val_fraction`, the rest train (`val_fraction` is also the fraction the
plan carves from train when gu2net leaves val empty). No pixel spacing: errors are normalised by
the wrist width.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medsapiens.shards.readers import (
    RawSample,
    ReaderError,
    Rejected,
    Unlabelled,
    choice,
    natural_key,
    number,
    order_split,
    read_text,
)

OPTIONS = {"split": "gu2net", "seed": "0", "val_fraction": "0.066", "test_fraction": "0.32"}
SPLIT_RULE = ("ids with a row and a JPG; split=gu2net: id order, 550 train, 59 val, rest test; split=seeded: sorted ids shuffled by "
              "numpy default_rng(seed), first test_fraction test, next val_fraction val, rest train")
LANDMARK_SET = "hand"
SPLIT_CHOICES = ("gu2net", "seeded")
SEEDED_OPTIONS = ("seed", "val_fraction", "test_fraction")
GU2NET_COUNTS = (550, 59)


def validation_rule(options: dict) -> str:
    if options["split"] == "gu2net":
        return "gu2net id order: the 59 after the first 550"
    return f"seeded: {options['val_fraction']} of the ids shuffled with seed {options['seed']}"


def check_options(options: dict) -> None:
    """Refuse, when the source is opened, a split, seed or test_fraction the seeded split cannot use."""
    if choice(options, "split", SPLIT_CHOICES) == "gu2net":
        given = [f"{k}={options[k]}" for k in SEEDED_OPTIONS if options[k] != OPTIONS[k]]
        if given:
            raise ReaderError(f"option(s) {', '.join(given)} apply with split=seeded only; the gu2net split is "
                              "fixed (id order: 550 train, 59 val, the rest test)")
    seeded_settings(options)


def seeded_settings(options: dict) -> tuple[int, float, float]:
    """(seed, test_fraction, val_fraction): seed a non-negative integer, test_fraction in [0, 1), and
    with split=seeded some train left (test_fraction + val_fraction < 1)."""
    seed, test, val = number(options, "seed", int), number(options, "test_fraction"), number(options, "val_fraction")
    if seed < 0:
        raise ReaderError(f"option seed={options['seed']!r} must be a non-negative integer")
    if not 0 <= test < 1:
        raise ReaderError(f"option test_fraction={options['test_fraction']!r} must lie in [0, 1)")
    if options["split"] == "seeded" and test + val >= 1:
        raise ReaderError(f"options test_fraction={options['test_fraction']!r} and val_fraction="
                          f"{options['val_fraction']!r} leave no train: their sum must be below 1")
    return seed, test, val


def assign_splits(ids: list[str], options: dict) -> dict[str, str]:
    ordered = sorted(ids, key=natural_key)
    if choice(options, "split", SPLIT_CHOICES) == "gu2net":
        n = len(ordered)
        names = order_split(n, (GU2NET_COUNTS[0] / n, GU2NET_COUNTS[1] / n) if n else (0, 0), ("train", "val", "test"))
        return dict(zip(ordered, names, strict=True))
    seed, test, val = seeded_settings(options)
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    return dict(zip(shuffled, order_split(len(shuffled), (test, val), ("test", "val", "train")), strict=True))


def parse_row(row: list[str]) -> tuple[tuple[float, float], ...]:
    values = [float(v) for v in row[1:] if v.strip()]
    if len(values) % 2:
        raise ValueError(f"{len(values)} coordinates, expected x,y pairs")
    return tuple(zip(values[0::2], values[1::2], strict=True))


def landmark_table(root: Path) -> Path:
    for table in (root / "all.csv", root / "labels" / "all.csv"):
        if table.is_file():
            return table
    raise ReaderError(f"no landmark table {root / 'all.csv'} or {root / 'labels' / 'all.csv'} (the hand layout is "
                      "jpg/<id>.jpg + all.csv)")


def table_rows(table: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each row that names an id. Payer's table holds plain numbers: no quoting."""
    rows = [(line, text.split(",")) for line, text in enumerate(read_text(table).splitlines(), 1)]
    return [(line, fields) for line, fields in rows if fields[0].strip()]


def scan(root: Path, options: dict):
    table = landmark_table(root)
    rows = table_rows(table)
    images = {p.stem: p for p in sorted((root / "jpg").glob("*.jpg"))}
    listed = {fields[0].strip() for _, fields in rows}
    for image_id, image in images.items():
        if image_id not in listed:
            yield Unlabelled(image_id, str(image))
    splits = assign_splits([image_id for image_id in listed if image_id in images], options)
    for line, fields in rows:
        image_id = fields[0].strip()
        if image_id not in splits:
            image = root / "jpg" / f"{image_id}.jpg"
            yield Rejected(image_id, f"{table}:{line}", "missing_image", f"{table} line {line}: no image {image}")
            continue
        try:
            points = parse_row(fields)
        except ValueError as exc:
            yield Rejected(image_id, f"{table}:{line}", "bad_annotation", f"{table} line {line}: {exc}", splits[image_id])
            continue
        yield RawSample(image_id, splits[image_id], str(images[image_id]), points)
