"""Synthetic X-ray-like datasets written in the real datasets' native layouts.

`write_phantoms(out, n, seed)` writes `out/head` (ISBI 2015), `out/hand` (hand atlas + all.csv),
`out/chest` (Shenzhen + ratio labels) and `out/leg` (BMPLE + meta JSON + split lists), so the
whole pipeline, demo and tests run through the same readers as real data. Files depend only on
(seed, set, index): the same seed writes byte-identical files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from medsapiens.errors import InputError
from medsapiens.shards.phantoms.anatomy import ANATOMIES, subject
from medsapiens.shards.phantoms.render import render

SETS = tuple(ANATOMIES)
PNG_LEVEL = 1  # phantoms are written often (tests, demo): fast compression over small files
HEAD_RANGES = (("TrainingData", 1, 150), ("Test1Data", 151, 300), ("Test2Data", 301, 400))
HEAD_SENIOR_NOISE, HEAD_JUNIOR_NOISE = 0.7, 1.5  # px of annotator disagreement
LEG_SPACING_MM = (0.55, 0.65)


def phantom(name: str, seed: int, index: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """(8-bit image, (K, 2) landmarks, the generator for any further randomness of this image)."""
    rng = np.random.default_rng([seed, SETS.index(name), index])
    parts, landmarks = subject(name, rng)
    return render(parts, ANATOMIES[name].size, rng), landmarks, rng


def spread_ids(n: int) -> list[tuple[str, int]]:
    """n ISBI (folder, id) pairs spread over the three official ranges in proportion 150:150:100."""
    counts = [round(n * 150 / 400), round(n * 150 / 400)]
    counts.append(n - sum(counts))
    if n >= 3:
        while min(counts) == 0:
            counts[counts.index(max(counts))] -= 1
            counts[counts.index(0)] += 1
    return [(folder, lo + (hi - lo + 1) * i // k)
            for (folder, lo, hi), k in zip(HEAD_RANGES, counts, strict=True) for i in range(k)]


def write_head(root: Path, n: int, seed: int) -> None:
    for index, (folder, number) in enumerate(spread_ids(n)):
        image, landmarks, rng = phantom("head", seed, index)
        path = root / "RawImage" / folder / f"{number:03d}.bmp"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        h, w = image.shape
        for who, noise in (("senior", HEAD_SENIOR_NOISE), ("junior", HEAD_JUNIOR_NOISE)):
            marked = np.clip(np.rint(landmarks + rng.normal(0, noise, landmarks.shape)), 0, (w - 1, h - 1)).astype(int)
            # ISBI files carry extra label lines after the 19 landmarks; the reader must skip them
            text = "".join(f"{x},{y}\n" for x, y in marked) + "1\n3\n2\n"
            note = root / "AnnotationsByMD" / f"400_{who}" / f"{number:03d}.txt"
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(text)


def write_hand(root: Path, n: int, seed: int) -> None:
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n):
        image, landmarks, _ = phantom("hand", seed, index)
        image_id = str(3001 + index)
        Image.fromarray(image).save(root / "jpg" / f"{image_id}.jpg", quality=92)
        rows.append(",".join([image_id, *(f"{v:.3f}" for v in landmarks.ravel())]))
    (root / "all.csv").write_text("\n".join(rows) + "\n")


def write_chest(root: Path, n: int, seed: int) -> None:
    (root / "pngs").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for index in range(n):
        image, landmarks, _ = phantom("chest", seed, index)
        name = f"CHNCXR_{index + 1:04d}_0"
        h, w = image.shape
        Image.fromarray(image).save(root / "pngs" / f"{name}.png", compress_level=PNG_LEVEL)
        ratios = "".join(f"{x / w:.6f} {y / h:.6f}\n" for x, y in landmarks)
        (root / "labels" / f"{name}.txt").write_text(f"{len(landmarks)}\n{ratios}")


def write_leg(root: Path, n: int, seed: int) -> None:
    (root / "pngs").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    ids = [f"L{index + 1:04d}" for index in range(n)]
    for index, image_id in enumerate(ids):
        image, landmarks, rng = phantom("leg", seed, index)
        h, w = image.shape
        spacing = round(float(rng.uniform(*LEG_SPACING_MM)), 4)
        Image.fromarray(image).save(root / "pngs" / f"{image_id}.png", compress_level=PNG_LEVEL)
        meta = {"gt": [[round(float(x), 3), round(float(y), 3)] for x, y in landmarks], "ID": image_id,
                "spacing": [spacing, spacing], "original_shape": [h, w]}
        (root / "meta" / f"{image_id}_meta.json").write_text(json.dumps(meta))
    (root / "test.txt").write_text("".join(f"{i}\n" for k, i in enumerate(ids) if k % 4 == 3))
    (root / "val.txt").write_text("".join(f"{i}\n" for k, i in enumerate(ids) if k % 10 == 4))


WRITERS = {"head": write_head, "hand": write_hand, "chest": write_chest, "leg": write_leg}


def write_phantoms(out, n: int = 60, seed: int = 0, sets=SETS) -> dict[str, Path]:
    """Write n phantom images per set under out/<set>; returns {set: its root}."""
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        raise InputError(f"unknown phantom set(s) {', '.join(unknown)}; sets: {', '.join(SETS)}")
    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    roots = {}
    for name in sets:
        roots[name] = Path(out) / name
        WRITERS[name](roots[name], n, seed)
    return roots
