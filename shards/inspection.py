"""`medsapiens shards inspect`: what a shard set holds, and a contact sheet to look at.

Records are read back the way the trainers read them (medsapiens.io.shard_tar).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
from PIL import Image, ImageDraw

from medsapiens.io.manifest import Manifest
from medsapiens.io.shard_tar import decode_pixels, decode_sample, read_shard

THUMB = 256


def read_samples(manifest: Manifest, dataset: str):
    """Every (key, record, sample) of one dataset, read and validated as the trainers read them
    (a ShardError or Rejection naming the shard and sample otherwise)."""
    landmark_set = manifest.landmark_set(dataset)
    for shard in (s for s in manifest.shards if s.dataset == dataset):
        for sample in read_shard(manifest, shard):
            _, record = decode_sample(sample, landmark_set, manifest.max_side)
            yield sample["__key__"], record, sample


def spread(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{values.min():.4g}..{values.max():.4g} (median {np.median(values):.4g})"


def dataset_lines(manifest: Manifest, dataset: str, records: list[dict]) -> list[str]:
    info = manifest.datasets[dataset]
    lset = info.landmark_set
    splits = ", ".join(f"{split} {count}" for split, count in sorted(info.splits.items())) or "no samples"
    lines = [f"{dataset}: K={lset.num_landmarks}, {splits}; reader {info.source.get('reader', '?')}"]
    if not records:
        return lines
    stored = [(round(r["orig_size"][0] * r["scale"][0]), round(r["orig_size"][1] * r["scale"][1])) for r in records]
    lines.append(f"  stored width {spread([s[0] for s in stored])}, height {spread([s[1] for s in stored])}")
    lines.append(f"  original width {spread([r['orig_size'][0] for r in records])}, "
                 f"height {spread([r['orig_size'][1] for r in records])}")
    spacings = [r["spacing_mm"] for r in records if r["spacing_mm"] is not None]
    if spacings:
        lines.append(f"  stored spacing mm/px x {spread([s[0] for s in spacings])}, y {spread([s[1] for s in spacings])}"
                     f" ({len(spacings)} of {len(records)} samples)")
    else:
        lines.append(f"  no pixel spacing; normalization {json.dumps(lset.normalization)}")
    invisible = sum(len(r["visible"]) - sum(r["visible"]) for r in records)
    lines.append(f"  invisible landmarks: {invisible}")
    return lines


def to_thumbnail(sample: dict, record: dict, key: str) -> Image.Image:
    pixels = decode_pixels(sample).astype(np.float64)
    if pixels.max() > 255:
        pixels = (pixels - pixels.min()) / max(1.0, pixels.max() - pixels.min()) * 255
    image = Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    factor = THUMB / max(image.size)
    image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))))
    draw = ImageDraw.Draw(image)
    for i, ((x, y), visible) in enumerate(zip(record["landmarks"], record["visible"], strict=True)):
        x, y = (x + 0.5) * factor - 0.5, (y + 0.5) * factor - 0.5
        colour = (255, 40, 40) if visible else (120, 120, 255)
        draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], outline=colour, width=2)
        draw.text((x + 3, y - 5), str(i), fill=(255, 255, 0))
    draw.text((3, 3), key, fill=(0, 255, 0))
    return image


def contact_sheet(thumbnails: list[Image.Image]) -> Image.Image:
    columns = math.ceil(math.sqrt(len(thumbnails)))
    rows = math.ceil(len(thumbnails) / columns)
    sheet = Image.new("RGB", (columns * THUMB, rows * THUMB), (24, 24, 24))
    for i, thumb in enumerate(thumbnails):
        sheet.paste(thumb, ((i % columns) * THUMB, (i // columns) * THUMB))
    return sheet


def inspect(manifest: Manifest, sheet_path: str | None = None, n: int = 16) -> list[str]:
    """Report lines; with sheet_path, also a PNG of up to n samples spread over the datasets."""
    lines = [f"{manifest.location}: {len(manifest.datasets)} dataset(s), {manifest.written} samples in "
             f"{len(manifest.shards)} shard(s); inputs {manifest.inputs} = written {manifest.written} + "
             f"rejected {manifest.rejected}"]
    per_dataset = math.ceil(n / max(1, len(manifest.datasets)))
    picked = defaultdict(list)
    for dataset in sorted(manifest.datasets):
        records = []
        for key, record, sample in read_samples(manifest, dataset):
            records.append(record)
            if sheet_path and len(picked[dataset]) < per_dataset:
                picked[dataset].append(to_thumbnail(sample, record, key))
        lines += dataset_lines(manifest, dataset, records)
    if sheet_path:
        thumbnails = [t for d in sorted(picked) for t in picked[d]][:n]
        if thumbnails:
            contact_sheet(thumbnails).save(sheet_path)
            lines.append(f"contact sheet of {len(thumbnails)} samples: {sheet_path}")
    return lines
