"""Digital Hand Atlas with Payer's 37 landmarks (`hand`).

    jpg/<image_id>.jpg
    all.csv    rows `image_id,x0,y0,...,x36,y36` (float pixels), no header

No official split: `split=gu2net` (default, GU2Net's, Zhu et al. MICCAI 2021) takes the ids in
natural order: 550 train, 59 val, the rest test (with fewer than 610 images the test split is
empty: the build summary warns); `split=seeded` shuffles the sorted ids with `seed` and takes
`test_fraction`, then `val_fraction`, the rest train (`val_fraction` is also the fraction the
plan carves from train when gu2net leaves val empty). No pixel spacing: errors are normalised by
the wrist width.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medsapiens.shards.readers import (
    RawSample,
    ReaderError,
    Rejected,
    choice,
    natural_key,
    number,
    order_split,
    read_text,
)

OPTIONS = {"split": "gu2net", "seed": "0", "val_fraction": "0.066", "test_fraction": "0.32"}
SPLIT_RULE = ("split=gu2net: id order, 550 train, 59 val, rest test; split=seeded: sorted ids shuffled by "
              "numpy default_rng(seed), first test_fraction test, next val_fraction val, rest train")
LANDMARK_SET = "hand"
SPLIT_CHOICES = ("gu2net", "seeded")
GU2NET_COUNTS = (550, 59)


def validation_rule(options: dict) -> str:
    if options["split"] == "gu2net":
        return "gu2net id order: the 59 after the first 550"
    return f"seeded: {options['val_fraction']} of the ids shuffled with seed {options['seed']}"


def assign_splits(ids: list[str], options: dict) -> dict[str, str]:
    ordered = sorted(ids, key=natural_key)
    if choice(options, "split", SPLIT_CHOICES) == "gu2net":
        n = len(ordered)
        names = order_split(n, (GU2NET_COUNTS[0] / n, GU2NET_COUNTS[1] / n) if n else (0, 0), ("train", "val", "test"))
        return dict(zip(ordered, names, strict=True))
    rng = np.random.default_rng(number(options, "seed", int))
    shuffled = [ordered[i] for i in rng.permutation(len(ordered))]
    fractions = (number(options, "test_fraction"), number(options, "val_fraction"))
    return dict(zip(shuffled, order_split(len(shuffled), fractions, ("test", "val", "train")), strict=True))


def parse_row(row: list[str]) -> tuple[tuple[float, float], ...]:
    values = [float(v) for v in row[1:] if v.strip()]
    if len(values) % 2:
        raise ValueError(f"{len(values)} coordinates, expected x,y pairs")
    return tuple(zip(values[0::2], values[1::2], strict=True))


def scan(root: Path, options: dict):
    table = root / "all.csv"
    if not table.is_file():
        raise ReaderError(f"no landmark table {table} (the hand layout is jpg/<id>.jpg + all.csv)")
    rows = [r for r in csv.reader(read_text(table).splitlines()) if r and r[0].strip()]
    splits = assign_splits(list({r[0].strip() for r in rows}), options)
    for line, row in enumerate(rows, 1):
        image_id = row[0].strip()
        try:
            points = parse_row(row)
        except ValueError as exc:
            yield Rejected(image_id, f"{table}:{line}", "bad_annotation", f"{table} line {line}: {exc}")
            continue
        yield RawSample(image_id, splits[image_id], str(root / "jpg" / f"{image_id}.jpg"), points)
    for image in sorted((root / "jpg").glob("*.jpg")):
        if image.stem not in splits:
            yield Rejected(image.stem, str(image), "missing_annotation", f"{image.name} has no row in {table}")
