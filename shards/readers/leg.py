"""Lower limb BMPLE (`leg`): 26 landmarks, 13 per leg, spacing per image.

    pngs/<id>.png
    meta/<id>_meta.json   {"gt": [[x, y] x 26], "ID": "...", "spacing": [sy, sx], "original_shape": [H, W]}

`spacing` and `original_shape` are in (row, col) order; the reader turns them into (x, y).
Split from list files of ids, one per line (`#` lines are comments): test from option `test_list`,
else `<root>/test.txt`, else the published MedSapiens test set shipped with this package
(`data/leg_medsapiens_test.txt`, 50 ids); val from option `val_list`, else `<root>/val.txt`;
every other id is train (the plan carves val from train when no val list is given).
"""
from __future__ import annotations

import reprlib
from pathlib import Path

from medsapiens.shards.readers import (
    BAD_INPUT,
    DATA,
    RawSample,
    ReaderError,
    Rejected,
    is_size,
    optional_path,
    point_list,
    read_json,
    read_text,
    rejected,
    spacing_pair,
)

OPTIONS = {"test_list": None, "val_list": None}
SPLIT_RULE = ("ids listed in test_list (else <root>/test.txt, else MedSapiens' published 50 test ids) -> test, "
              "in val_list (else <root>/val.txt) -> val, all others train")
LANDMARK_SET = "leg"
MEDSAPIENS_TEST = DATA / "leg_medsapiens_test.txt"


def validation_rule(options: dict) -> str:
    return "val list"


def read_list(path: Path | None) -> list[str]:
    if path is None:
        return []
    lines = (line.strip() for line in read_text(path).splitlines())
    return [Path(line).stem for line in lines if line and not line.startswith("#")]


def split_lists(root: Path, options: dict) -> dict[str, str]:
    test = read_list(optional_path(root, options, "test_list", "test.txt") or MEDSAPIENS_TEST)
    val = read_list(optional_path(root, options, "val_list", "val.txt"))
    both = sorted(set(test) & set(val))
    if both:
        raise ReaderError(f"leg ids in both the test and the val list: {', '.join(both[:5])}")
    return {**{i: "val" for i in val}, **{i: "test" for i in test}}


def parse_meta(path: Path) -> dict:
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {reprlib.repr(meta)}")
    shape = meta["original_shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(map(is_size, shape))):
        raise ValueError(f"original_shape must be [H, W] in whole pixels, got {reprlib.repr(shape)}")
    return {"points": point_list(meta["gt"], "gt"), "spacing": spacing_pair(meta["spacing"], "spacing [sy, sx]", "yx"),
            "size": (int(shape[1]), int(shape[0]))}


def scan(root: Path, options: dict):
    listed = split_lists(root, options)
    metas = {p.name[: -len("_meta.json")]: p for p in (root / "meta").glob("*_meta.json")}
    images = {p.stem for p in (root / "pngs").glob("*.png")}
    for image_id in sorted(set(metas) | images | set(listed)):
        image = root / "pngs" / f"{image_id}.png"
        if image_id not in metas:
            reason = "missing_annotation" if image_id in images else "missing_image"
            detail = f"no {image_id}_meta.json in {root / 'meta'}" if image_id in images else \
                f"{image_id} is listed for {listed[image_id]} but has neither image nor meta file"
            yield Rejected(image_id, str(image), reason, detail, listed.get(image_id, "train"))
            continue
        try:
            meta = parse_meta(metas[image_id])
        except BAD_INPUT as exc:
            yield rejected(image_id, metas[image_id], exc, split=listed.get(image_id, "train"))
            continue
        yield RawSample(
            image_id, listed.get(image_id, "train"), str(image), meta["points"],
            spacing_mm=meta["spacing"], spacing_from="meta.json spacing [sy, sx]", expected_size=meta["size"],
        )
