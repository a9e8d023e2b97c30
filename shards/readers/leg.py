"""Lower limb BMPLE (`leg`): 26 landmarks, 13 per leg, spacing per image.

    pngs/<id>.png
    meta/<id>_meta.json   {"gt": [[x, y] x 26], "ID": "...", "spacing": [sy, sx], "original_shape": [H, W]}

`spacing` and `original_shape` are in (row, col) order; the reader turns them into (x, y).
Split from list files of ids, one per line: options `test_list` and `val_list`, by default
`<root>/test.txt` and `<root>/val.txt` where present; every other id is train.
"""
from __future__ import annotations

import json
from pathlib import Path

from shards.readers import RawSample, ReaderError, Rejected, optional_path, read_text

OPTIONS = {"test_list": None, "val_list": None}
SPLIT_RULE = "ids listed in test_list -> test, in val_list -> val, all others train"
LANDMARK_SET = "leg"


def read_list(path: Path | None) -> list[str]:
    if path is None:
        return []
    return [Path(line.strip()).stem for line in read_text(path).splitlines() if line.strip()]


def split_lists(root: Path, options: dict) -> dict[str, str]:
    test = read_list(optional_path(root, options, "test_list", "test.txt"))
    val = read_list(optional_path(root, options, "val_list", "val.txt"))
    both = sorted(set(test) & set(val))
    if both:
        raise ReaderError(f"leg ids in both the test and the val list: {', '.join(both[:5])}")
    return {**{i: "val" for i in val}, **{i: "test" for i in test}}


def parse_meta(path: Path) -> dict:
    meta = json.loads(read_text(path))
    sy, sx = (float(v) for v in meta["spacing"])
    h, w = (int(v) for v in meta["original_shape"])
    points = tuple((float(x), float(y)) for x, y in meta["gt"])
    return {"points": points, "spacing": (sx, sy), "size": (w, h)}


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
            yield Rejected(image_id, str(image), reason, detail)
            continue
        try:
            meta = parse_meta(metas[image_id])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            yield Rejected(image_id, str(metas[image_id]), "bad_annotation", f"{metas[image_id]}: {exc!r}")
            continue
        yield RawSample(
            image_id, listed.get(image_id, "train"), str(image), meta["points"],
            spacing_mm=meta["spacing"], spacing_from="meta.json spacing [sy, sx]", expected_size=meta["size"],
        )
