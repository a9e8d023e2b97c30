"""DICOM images with COCO keypoint annotations (`dicom`).

Convention: a directory of DICOM files (`.dcm`, or without extension as PACS exports them,
recognised by the DICOM preamble; subfolders allowed) and, in the directory itself, a COCO
keypoints JSON (see `coco`) whose `file_name`s are the DICOM paths relative to it. Several JSONs
split by name (`*_train_*.json`, ...) work as for `coco`.

Pixel spacing: an image's own `spacing` [sx, sy] in the COCO JSON wins; else the DICOM header's
`PixelSpacing` (0028,0030), else `ImagerPixelSpacing` (0018,1164) (detector plane, not corrected
for magnification), else none; both tags are stored [row, col] and are reversed to (x, y); a zero
or negative tag counts as absent. Where the spacing came from is recorded in the manifest. Only
the header is read here; pixels are decoded by the writer (`medsapiens.io.imageio`: Modality LUT,
VOI LUT or window, MONOCHROME1 inverted, 16-bit depth kept; a multi-frame file is rejected).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from medsapiens.io.imageio import dicom_spacing, is_dicom
from medsapiens.shards.readers import RawSample, ReaderError, Rejected, coco

OPTIONS = coco.OPTIONS
CARVES_TEST = coco.CARVES_TEST
SPLIT_RULE = coco.SPLIT_RULE
LANDMARK_SET = None


def landmark_names(root: Path, options: dict):
    return coco.landmark_names(root, options)


def with_header_spacing(sample: RawSample):
    if sample.spacing_mm is not None or not Path(sample.image).is_file():
        return sample
    try:
        spacing, label = dicom_spacing(Path(sample.image))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a bad file
        return Rejected(sample.source_id, sample.image, "unreadable_image", f"{sample.image}: not a DICOM file ({exc})",
                        sample.split)
    return replace(sample, spacing_mm=spacing, spacing_from=label)


def named_files(path: Path, data: dict) -> set[Path]:
    """Every file a COCO JSON's images[] names, those of entries it rejects too (they are counted there,
    once), wherever the coco reader would look for them."""
    return {(path.parent / folder / entry["file_name"]).resolve() for entry in data["images"]
            if isinstance(entry, dict) and isinstance(entry.get("file_name"), str) and "\0" not in entry["file_name"]
            for folder in coco.IMAGE_DIRS}


def scan(root: Path, options: dict):
    if not root.is_dir():
        raise ReaderError(f"the dicom reader takes a directory of DICOM files and a COCO JSON, got {root}")
    named = set()
    for path in coco.annotation_files(root):
        data = coco.load_json(path)
        named |= named_files(path, data)
        for item in coco.scan_file(path, options["split"], data):
            yield with_header_spacing(item) if isinstance(item, RawSample) else item
    for dcm in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".json" and is_dicom(p)):
        if dcm.resolve() not in named:
            yield Rejected(dcm.stem, str(dcm), "missing_annotation", f"{dcm} is named by no COCO JSON in {root}")
