"""COCO keypoints JSON (`coco`), e.g. MedSapiens' `<set>_coco_{train,val,test}_annotations.json`.

    images[{id, file_name, height, width, spacing?: [sx, sy]}]
    annotations[{image_id, keypoints: [x, y, v] * K, ...}]     one per image
    categories[{keypoints: [names], flip_pairs?: [[i, j], ...], skeleton?}]   one with keypoints

The source path is one JSON or a directory of them. A file's split comes from `_train_`,
`_val_`/`_valid_` or `_test_` in its name, else from the `split` option. Images are looked up
relative to the JSON's directory, then in its `images/` subdirectory. v = 0 marks a landmark
invisible (its position is ignored); v = 1 or 2 visible (its position is known).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path, PurePosixPath

from shards.readers import RawSample, ReaderError, Rejected, first_existing, read_text

OPTIONS = {"split": "train"}
SPLIT_RULE = "from _train_/_val_/_valid_/_test_ in the JSON file name, else the split option"
LANDMARK_SET = None
SPLIT_IN_NAME = re.compile(r"(?:^|[_.-])(train|val|valid|test)(?=[_.-])")


def annotation_files(root: Path) -> list[Path]:
    files = sorted(root.glob("*.json")) if root.is_dir() else [root]
    if not files:
        raise ReaderError(f"no COCO JSON file in {root}")
    return files


def split_from_name(path: Path, default: str) -> str:
    found = SPLIT_IN_NAME.search(path.name)
    if not found:
        return default
    return "val" if found.group(1) == "valid" else found.group(1)


def load_json(path: Path) -> dict:
    try:
        data = json.loads(read_text(path))
    except (OSError, ValueError) as exc:
        raise ReaderError(f"{path}: not a readable COCO JSON ({exc})") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise ReaderError(f"{path}: a COCO keypoints file needs images, annotations and categories")
    return data


def keypoint_category(data: dict, path: Path) -> dict:
    found = [c for c in data["categories"] if c.get("keypoints")]
    if len(found) != 1:
        raise ReaderError(f"{path}: expected one category with keypoints, found {len(found)}")
    return found[0]


def landmark_names(root: Path, options: dict):
    """(names, flip_pairs) from the keypoint category; every file must agree."""
    found = {}
    for path in annotation_files(root):
        category = keypoint_category(load_json(path), path)
        pairs = category.get("flip_pairs")
        found[path] = (tuple(category["keypoints"]), None if pairs is None else tuple(tuple(p) for p in pairs))
    if len(set(found.values())) > 1:
        raise ReaderError(f"COCO files under {root} disagree on keypoint names or flip pairs")
    return next(iter(found.values()))


def parse_keypoints(values) -> tuple[tuple, tuple]:
    if len(values) % 3:
        raise ValueError(f"{len(values)} keypoint values, expected x, y, v triples")
    triples = [values[i:i + 3] for i in range(0, len(values), 3)]
    return tuple((float(x), float(y)) for x, y, _ in triples), tuple(int(v > 0) for _, _, v in triples)


def parse_spacing(entry: dict):
    if entry.get("spacing") is None:
        return None
    return tuple(float(v) for v in entry["spacing"])


def scan_file(path: Path, default_split: str):
    data = load_json(path)
    split = split_from_name(path, default_split)
    by_image = defaultdict(list)
    images = {entry["id"]: entry for entry in data["images"]}
    for number, ann in enumerate(data["annotations"]):
        if ann.get("image_id") not in images:
            yield Rejected(f"annotation-{number}", str(path), "missing_image",
                           f"{path}: annotation {number} names image_id {ann.get('image_id')!r}, absent from images[]")
            continue
        by_image[ann["image_id"]].append(ann)
    for image_id, entry in images.items():
        name = str(entry.get("file_name", ""))
        source_id = str(PurePosixPath(name).with_suffix("")) if name else f"image-{image_id}"
        where = f"{path} image {image_id} ({name})"
        anns = by_image.get(image_id, [])
        if len(anns) != 1:
            reason = "missing_annotation" if not anns else "bad_annotation"
            yield Rejected(source_id, str(path), reason, f"{where}: {len(anns)} annotations, expected one")
            continue
        try:
            points, visible = parse_keypoints(anns[0].get("keypoints", []))
            spacing = parse_spacing(entry)
        except (TypeError, ValueError) as exc:
            yield Rejected(source_id, str(path), "bad_annotation", f"{where}: {exc}")
            continue
        size = (int(entry["width"]), int(entry["height"])) if entry.get("width") and entry.get("height") else None
        yield RawSample(
            source_id, split, str(first_existing([path.parent / name, path.parent / "images" / name])),
            points, visible, spacing, "COCO image spacing [sx, sy]" if spacing else "none", size,
        )


def scan(root: Path, options: dict):
    for path in annotation_files(root):
        yield from scan_file(path, options["split"])
