"""COCO keypoints JSON (`coco`), e.g. MedSapiens' `<set>_coco_{train,val,test}_annotations.json`.

    images[{id, file_name, height, width, spacing?: [sx, sy]}]
    annotations[{image_id, keypoints: [x, y, v] * K, ...}]     one per image
    categories[{keypoints: [names], flip_pairs?: [[i, j], ...], skeleton?}]   one with keypoints

The source path is one JSON or a directory of them. A file's split comes from `_train_`,
`_val_`/`_valid_` or `_test_` in its name, else from the `split` option. Images are looked up
relative to the JSON's directory, then in its `images/` and `Images/` subdirectories (MedSapiens'
`data/med_sapien/Images`). v = 0 marks a landmark invisible (its position is ignored); v = 1 or 2
visible (its position is known).

Spacing: an image's own `spacing` [sx, sy] wins; else, for a file named
`<set>_coco_<split>_annotations.json`, the MedSapiens meta file beside it,
`<set>_meta_json/<image id>_meta.json` (or `<file stem>_meta.json`), whose `spacing` is
[sy, sx] (reversed here); else none (the plan may still give a registry set its native spacing).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path, PurePosixPath

from medsapiens.shards.readers import RawSample, ReaderError, Rejected, first_existing, read_text

OPTIONS = {"split": "train", "test_fraction": "0", "test_seed": "0"}
CARVES_TEST = True  # test_fraction > 0: a seeded test split carved from train (shards.plan.with_test)
SPLIT_RULE = "from _train_/_val_/_valid_/_test_ in the JSON file name, else the split option"
LANDMARK_SET = None
SPLIT_IN_NAME = re.compile(r"(?:^|[_.-])(train|val|valid|test)(?=[_.-])")
MEDSAPIENS_NAME = re.compile(r"^(?P<set>.+)_coco_(?:train|val|valid|test)_annotations\.json$")
IMAGE_DIRS = (".", "images", "Images")


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


def meta_folder(path: Path) -> Path | None:
    """MedSapiens' `<set>_meta_json/` beside a `<set>_coco_<split>_annotations.json`, where present."""
    found = MEDSAPIENS_NAME.match(path.name)
    folder = path.parent / f"{found['set']}_meta_json" if found else None
    return folder if folder and folder.is_dir() else None


def meta_file(meta: Path | None, entry: dict) -> Path | None:
    """An image's MedSapiens meta file: `<image id>_meta.json` (what MedSapiens' evaluation opens),
    else `<file stem>_meta.json`."""
    if meta is None:
        return None
    stems = (str(entry.get("id")), PurePosixPath(str(entry.get("file_name", ""))).stem)
    return next((meta / f"{s}_meta.json" for s in stems if (meta / f"{s}_meta.json").is_file()), None)


def parse_spacing(entry: dict, meta: Path | None) -> tuple[tuple | None, str]:
    """(spacing (x, y) or None, where it came from): the image's own, else its meta file's [sy, sx]."""
    if entry.get("spacing") is not None:
        return tuple(float(v) for v in entry["spacing"]), "COCO image spacing [sx, sy]"
    path = meta_file(meta, entry)
    if path is None:
        return None, "none"
    try:
        sy, sx = (float(v) for v in json.loads(read_text(path))["spacing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} has no spacing [sy, sx] ({exc!r})") from None
    return (sx, sy), f"{meta.name}/<id>_meta.json spacing [sy, sx]"


def scan_file(path: Path, default_split: str):
    data = load_json(path)
    split = split_from_name(path, default_split)
    meta = meta_folder(path)
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
            spacing, spacing_from = parse_spacing(entry, meta)
        except (TypeError, ValueError) as exc:
            yield Rejected(source_id, str(path), "bad_annotation", f"{where}: {exc}")
            continue
        size = (int(entry["width"]), int(entry["height"])) if entry.get("width") and entry.get("height") else None
        yield RawSample(
            source_id, split, str(first_existing(path.parent / folder / name for folder in IMAGE_DIRS)),
            points, visible, spacing, spacing_from, size,
        )


def scan(root: Path, options: dict):
    for path in annotation_files(root):
        yield from scan_file(path, options["split"])
