"""ISBI 2015 cephalometric challenge (`head`): 400 BMP images, 19 landmarks by two doctors.

    RawImage/{TrainingData,Test1Data,Test2Data}/NNN.bmp
    AnnotationsByMD/400_senior/NNN.txt, AnnotationsByMD/400_junior/NNN.txt
        one `x,y` line per landmark in image pixels; the first 19 lines are the landmarks

The split follows the official id ranges (the image may sit in any RawImage folder). There is no
official val: `val=seeded` (default) leaves it to the plan's seeded carve from train
(docs/splits.md); `val=gu2net` takes GU2Net's ids 131-150 (Zhu et al., MICCAI 2021: 130 train, 20 val).
"""
from __future__ import annotations

from pathlib import Path

from medsapiens.io import registry
from medsapiens.io.record import Rejection
from medsapiens.shards.readers import BAD_INPUT, RawSample, Rejected, choice, first_existing, read_text, rejected

OPTIONS = {"gt": "mean", "val": "seeded"}
SPLIT_RULE = ("official id ranges: 001-150 train, 151-300 test1, 301 and above test2; "
              "val=seeded: val carved from train; val=gu2net: 131-150 val")
LANDMARK_SET = "head"
SPACING_MM = registry.get(LANDMARK_SET).native_spacing_mm
ANNOTATORS = {"senior": ("senior",), "junior": ("junior",), "mean": ("senior", "junior")}
IMAGE_FOLDERS = ("TrainingData", "Test1Data", "Test2Data")
VAL_CHOICES = ("seeded", "gu2net")
GU2NET_VAL = range(131, 151)


def split_of(number: int, val: str = "seeded") -> str:
    if val == "gu2net" and number in GU2NET_VAL:
        return "val"
    return "train" if number <= 150 else "test1" if number <= 300 else "test2"


def validation_rule(options: dict) -> str:
    return "gu2net ids 131-150" if options["val"] == "gu2net" else "source split"


def parse_points(path: Path, k: int) -> list[tuple[float, float]]:
    """The first k `x,y` lines (fewer when the file has fewer)."""
    lines = [line.strip() for line in read_text(path).splitlines() if line.strip()][:k]
    points = []
    for number, line in enumerate(lines, 1):
        parts = line.replace(" ", "").split(",")
        try:
            x, y = (float(p) for p in parts)
        except ValueError:
            raise ValueError(f"line {number} is {line!r}, expected 'x,y'") from None
        points.append((x, y))
    return points


def annotator_points(path: Path, k: int) -> list[tuple[float, float]]:
    """One doctor's k landmarks; a file with fewer is rejected naming it, not averaged short."""
    points = parse_points(path, k)
    if len(points) < k:
        raise Rejection("wrong_landmark_count", f"{len(points)} landmark lines, expected {k}")
    return points


def image_ids(root: Path) -> set[str]:
    return {p.stem for p in root.glob("RawImage/*/*.bmp")}


def annotation_path(root: Path, who: str, image_id: str) -> Path:
    return root / "AnnotationsByMD" / f"400_{who}" / f"{image_id}.txt"


def scan(root: Path, options: dict):
    who = ANNOTATORS[choice(options, "gt", tuple(ANNOTATORS))]
    val = choice(options, "val", VAL_CHOICES)
    k = registry.get(LANDMARK_SET).num_landmarks
    folders = sorted(p for p in (root / "RawImage").glob("*") if p.is_dir()) or [root / "RawImage" / IMAGE_FOLDERS[0]]
    ids = image_ids(root) | {p.stem for w in who for p in (root / "AnnotationsByMD" / f"400_{w}").glob("*.txt")}
    for image_id in sorted(ids):
        if not (image_id.isascii() and image_id.isdigit()):
            yield Rejected(image_id, str(root), "bad_annotation", f"id {image_id!r} is not an ISBI number NNN")
            continue
        split = split_of(int(image_id), val)
        paths = [annotation_path(root, w, image_id) for w in who]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            yield Rejected(image_id, str(missing[0]), "missing_annotation", f"no annotation file {missing[0]}", split)
            continue
        per_doctor = []
        for path in paths:
            try:
                per_doctor.append(annotator_points(path, k))
            except BAD_INPUT as exc:
                yield rejected(image_id, path, exc, split=split)
                break
        else:
            points = [tuple(sum(p[i][axis] for p in per_doctor) / len(per_doctor) for axis in (0, 1)) for i in range(k)]
            yield RawSample(
                source_id=image_id,
                split=split,
                image=str(first_existing(folder / f"{image_id}.bmp" for folder in folders)),
                landmarks=tuple(points),
                spacing_mm=(SPACING_MM, SPACING_MM),
                spacing_from="ISBI 2015 fixed 0.1 mm/px",
            )
