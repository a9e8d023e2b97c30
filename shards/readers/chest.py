"""Shenzhen chest X-rays with GU2Net's 6 landmarks (`chest`).

    pngs/<name>.png
    labels/<name>.txt   first line the landmark count, then one `x y` line per landmark,
                        as ratios of the image width and height in [0, 1]

A ratio becomes a pixel position as x = rx * W, y = ry * H (GU2Net's `round(ratio * size)`,
kept unrounded), so the reader reads each PNG's header for its size (not its pixels).
Split in name order as GU2Net: the first 195/279 train, the next 34/279 val, the rest test.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from shards.readers import RawSample, Rejected, order_split, read_text

OPTIONS: dict[str, str] = {}
SPLIT_RULE = "name order: first round(n*195/279) train, next round(n*34/279) val, rest test (GU2Net)"
LANDMARK_SET = "chest"


def parse_ratios(path: Path) -> list[tuple[float, float]]:
    lines = [line.split() for line in read_text(path).splitlines() if line.strip()]
    if not lines or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise ValueError("first line must be the landmark count")
    count, rows = int(lines[0][0]), lines[1:]
    if count != len(rows):
        raise ValueError(f"says {count} landmarks but has {len(rows)} lines")
    try:
        return [(float(x), float(y)) for x, y in rows]
    except ValueError:
        raise ValueError("landmark lines must be 'x y' ratios") from None


def scan(root: Path, options: dict):
    names = sorted({p.stem for p in (root / "pngs").glob("*.png")} | {p.stem for p in (root / "labels").glob("*.txt")})
    splits = order_split(len(names), (195 / 279, 34 / 279), ("train", "val", "test"))
    for name, split in zip(names, splits):
        image, label = root / "pngs" / f"{name}.png", root / "labels" / f"{name}.txt"
        if not label.is_file():
            yield Rejected(name, str(image), "missing_annotation", f"no label file {label}")
            continue
        if not image.is_file():
            yield Rejected(name, str(label), "missing_image", f"no image {image}")
            continue
        try:
            ratios = parse_ratios(label)
        except (ValueError, UnicodeDecodeError) as exc:
            yield Rejected(name, str(label), "bad_annotation", f"{label}: {exc}")
            continue
        try:
            with Image.open(image) as im:
                width, height = im.size
        except Exception as exc:  # noqa: BLE001 - any decoder failure means the same to us
            yield Rejected(name, str(image), "unreadable_image", f"{image}: {exc}")
            continue
        points = tuple((rx * width, ry * height) for rx, ry in ratios)
        yield RawSample(name, split, str(image), points, expected_size=(width, height))
