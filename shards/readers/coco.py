"""COCO keypoints JSON (`coco`), e.g. MedSapiens' `<set>_coco_{train,val,test}_annotations.json`.

    images[{id, file_name, height, width, spacing?: [sx, sy]}]
    annotations[{image_id, keypoints: [x, y, v] * K, ...}]     one per image
    categories[{keypoints: [names], flip_pairs?: [[i, j], ...], skeleton?}]   one with keypoints

The source path is one JSON or a directory of them. A file's split comes from its name, a word
between separators (`_`, `-`, `.`, space) in any letter case: `train`/`training` -> train,
`val`/`valid`/`validation` -> val, `test`/`testing` -> test; a number after `test` is kept (ISBI's
`test1`, `test2`), one after the others dropped (COCO's `train2017` is train). A name without such a
word takes the `split` option. Images are looked up relative to the JSON's directory, then in its
`images/` and `Images/` subdirectories (MedSapiens' `data/med_sapien/Images`). v = 0 marks a
landmark invisible (its position is ignored); v = 1 or 2 visible (its position is known). An image
id listed twice: the first entry is kept, the second rejected (`duplicate_id`); a malformed entry is
rejected (`bad_annotation`), a file whose images, annotations or categories are not lists stops the
source in one line.

Spacing: an image's own `spacing` [sx, sy] wins; else, for a file named
`<set>_coco_<split>_annotations.json`, the MedSapiens meta file beside it,
`<set>_meta_json/<image id>_meta.json` (or `<file stem>_meta.json`), whose `spacing` is
[sy, sx] (reversed here); else none (the plan may still give a registry set its native spacing).
"""
from __future__ import annotations

import dataclasses
import re
import reprlib
from collections import defaultdict
from pathlib import Path, PurePosixPath

from medsapiens.io import registry
from medsapiens.io.record import is_number, is_whole
from medsapiens.shards.readers import (
    BAD_INPUT,
    RawSample,
    ReaderError,
    Rejected,
    first_existing,
    is_size,
    read_json,
    rejected,
    spacing_pair,
)

OPTIONS = {"split": "train", "test_fraction": "0", "test_seed": "0"}
CARVES_TEST = True  # test_fraction > 0: a seeded test split carved from train (shards.plan.with_test)
SPLIT_RULE = ("from train/val/valid/test in the JSON file name (any case, a word of its own or with 'set': testset; "
              "test1, test2 kept apart), else the split option")
LANDMARK_SET = None
SPLIT_IN_NAME = re.compile(r"(?:^|[_. ()\[\]-])(training|train|validation|valid|val|testing|test)(\d*)(?:set)?(?=[_. ()\[\]-])",
                           re.IGNORECASE)
SPLIT_WORDS = {"training": "train", "validation": "val", "valid": "val", "testing": "test"}
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
    split = SPLIT_WORDS.get(found.group(1).lower(), found.group(1).lower())
    return split + found.group(2) if split == "test" else split


def load_json(path: Path) -> dict:
    """The file's top level, checked: images, annotations and categories lists (else one line naming it)."""
    try:
        data = read_json(path)
    except ValueError as exc:  # read_json's errors name the file
        raise ReaderError(f"not a readable COCO JSON: {exc}") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise ReaderError(f"{path}: a COCO keypoints file needs images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise ReaderError(f"{path}: {key} must be a list, got {reprlib.repr(data[key])}")
    return data


def keypoint_category(data: dict, path: Path) -> dict:
    found = [c for c in data["categories"] if isinstance(c, dict) and c.get("keypoints")]
    if len(found) != 1:
        raise ReaderError(f"{path}: expected one category with keypoints, found {len(found)}")
    return found[0]


def category_landmarks(category: dict, path: Path) -> tuple[tuple, tuple | None]:
    """(names, flip_pairs) of the keypoint category: names non-empty strings, pairs [i, j] indices of them."""
    names, pairs = category["keypoints"], category.get("flip_pairs")
    if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
        raise ReaderError(f"{path}: the category's keypoints must be a list of names, got {reprlib.repr(names)}")
    if pairs is None:
        return tuple(names), None
    if not (isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 and all(
            is_whole(i) and 0 <= i < len(names) for i in p) for p in pairs)):
        raise ReaderError(f"{path}: flip_pairs must be [i, j] keypoint indices 0..{len(names) - 1}, "
                          f"got {reprlib.repr(pairs)}")
    twice = registry.landmark_in_two_flip_pairs(pairs)
    if twice is not None:
        raise ReaderError(f"{path}: flip_pairs put keypoint {twice} ({names[twice]!r}) in two pairs, got "
                          f"{reprlib.repr(pairs)}")
    return tuple(names), tuple(tuple(p) for p in pairs)


def landmark_names(root: Path, options: dict):
    """(names, flip_pairs) from the keypoint category; every file must agree."""
    found = {path: category_landmarks(keypoint_category(load_json(path), path), path)
             for path in annotation_files(root)}
    if len(set(found.values())) > 1:
        raise ReaderError(f"COCO files under {root} disagree on keypoint names or flip pairs")
    return next(iter(found.values()))


def parse_keypoints(values) -> tuple[tuple, tuple]:
    if not (isinstance(values, list) and all(map(is_number, values))):
        raise ValueError(f"keypoints must be a list of numbers, got {reprlib.repr(values)}")
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
        return spacing_pair(entry["spacing"], "the image's spacing [sx, sy]"), "COCO image spacing [sx, sy]"
    path = meta_file(meta, entry)
    if path is None:
        return None, "none"
    document = read_json(path)
    if not isinstance(document, dict) or "spacing" not in document:
        raise ValueError(f"{path} has no spacing [sy, sx]")
    spacing = spacing_pair(document["spacing"], f"spacing [sy, sx] in {path}", "yx")
    return spacing, f"{meta.name}/<id>_meta.json spacing [sy, sx]"


def image_size(entry: dict) -> tuple[int, int] | None:
    """(width, height) the entry claims, or None when it gives neither."""
    width, height = entry.get("width"), entry.get("height")
    if width is None and height is None:
        return None
    if not (is_size(width) and is_size(height)):
        raise ValueError(f"width and height must be whole pixels, got {reprlib.repr(width)} x {reprlib.repr(height)}")
    return int(width), int(height)


def is_id(value) -> bool:
    return is_whole(value) or isinstance(value, str)


def image_source_id(entry: dict, image_id) -> str:
    name = entry.get("file_name")
    return str(PurePosixPath(name).with_suffix("")) if isinstance(name, str) and name else f"image-{image_id}"


def index_images(path: Path, entries: list) -> tuple[dict, list[Rejected]]:
    """{image id: (position, entry)} of the well-formed entries, and a rejection for every other one
    (no usable id; an id listed before: the first is kept)."""
    images: dict = {}
    rejections = []
    for number, entry in enumerate(entries):
        image_id = entry.get("id") if isinstance(entry, dict) else None
        where = f"{path} images[{number}]"
        if not is_id(image_id):
            rejections.append(Rejected(f"image-{number}", str(path), "bad_annotation",
                                       f"{where}: an image needs an id (number or string): {reprlib.repr(entry)}"))
        elif image_id in images:
            rejections.append(Rejected(image_source_id(entry, image_id), str(path), "duplicate_id",
                                       f"{where}: image id {image_id!r} is listed before, at images"
                                       f"[{images[image_id][0]}]; the first is kept"))
        else:
            images[image_id] = (number, entry)
    return images, rejections


def group_annotations(path: Path, entries: list, images: dict) -> tuple[dict, list[Rejected]]:
    """{image id: its annotations}, and a rejection for each annotation that names no listed image."""
    by_image = defaultdict(list)
    rejections = []
    for number, ann in enumerate(entries):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        where = f"{path} annotations[{number}]"
        if not is_id(image_id):
            rejections.append(Rejected(f"annotation-{number}", str(path), "bad_annotation",
                                       f"{where}: an annotation needs an image_id (number or string): "
                                       f"{reprlib.repr(ann)}"))
        elif image_id not in images:
            rejections.append(Rejected(f"annotation-{number}", str(path), "missing_image",
                                       f"{where} names image_id {image_id!r}, absent from images[]"))
        else:
            by_image[image_id].append(ann)
    return by_image, rejections


def image_item(path: Path, split: str, meta: Path | None, image_id, number: int, entry: dict, anns: list):
    """The RawSample of images[number] with its annotations, or its rejection."""
    source_id, name = image_source_id(entry, image_id), entry.get("file_name", "")
    where = f"{path} images[{number}] (id {image_id!r})"
    if len(anns) != 1:
        reason = "missing_annotation" if not anns else "bad_annotation"
        return Rejected(source_id, str(path), reason, f"{where}: {len(anns)} annotations, expected one", split)
    try:
        if not isinstance(name, str):
            raise ValueError(f"file_name must be a string, got {reprlib.repr(name)}")
        points, visible = parse_keypoints(anns[0].get("keypoints", []))
        spacing, spacing_from = parse_spacing(entry, meta)
        size = image_size(entry)
    except BAD_INPUT as exc:
        return rejected(source_id, path, exc, where, split)
    image = first_existing(path.parent / folder / name for folder in IMAGE_DIRS)
    return RawSample(source_id, split, str(image), points, visible, spacing, spacing_from, size)


def scan_file(path: Path, default_split: str, data: dict | None = None):
    """The items of one COCO file; `data`, its load_json, where the caller has read it already."""
    data = load_json(path) if data is None else data
    split = split_from_name(path, default_split)
    meta = meta_folder(path)
    images, bad_images = index_images(path, data["images"])
    by_image, bad_annotations = group_annotations(path, data["annotations"], images)
    yield from (dataclasses.replace(r, split=split) for r in bad_images + bad_annotations)
    for image_id, (number, entry) in images.items():
        yield image_item(path, split, meta, image_id, number, entry, by_image.get(image_id, []))


def scan(root: Path, options: dict):
    for path in annotation_files(root):
        yield from scan_file(path, options["split"])
