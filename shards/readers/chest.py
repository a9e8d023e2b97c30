"""Shenzhen chest X-rays with GU2Net's 6 landmarks (`chest`).

    pngs/<name>.png
    labels/<name>.txt   first line the landmark count, then one `x y` line per landmark,
                        as ratios of the image width and height in [0, 1]

A ratio becomes a pixel position as x = rx * W, y = ry * H (GU2Net's `round(ratio * size)`,
kept unrounded), so the reader reads each PNG's header for its size (not its pixels).
The inputs are the labelled names (those with a labels/<name>.txt): the Shenzhen folder has 662
PNGs, GU2Net labelled 279. PNGs without a label are reported as `Unlabelled` (counted, not
rejected). Split over the labelled names in sorted order as GU2Net: the first 195/279 train, the
next 34/279 val, the rest test (195/34/50 on the real set).
"""
from __future__ import annotations

from pathlib import Path

from medsapiens.io.imageio import displayed_size, open_image
from medsapiens.io.record import Rejection
from medsapiens.shards.readers import BAD_INPUT, RawSample, Rejected, Unlabelled, order_split, read_text, rejected

OPTIONS: dict[str, str] = {}
SPLIT_RULE = ("labelled names in order: first round(n*195/279) train, next round(n*34/279) val, rest test "
              "(GU2Net); PNGs without a label are not inputs")
LANDMARK_SET = "chest"
GU2NET_FRACTIONS = (195 / 279, 34 / 279)


def validation_rule(options: dict) -> str:
    return "gu2net name order: the 34/279 after the first 195/279"


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
    names = sorted(p.stem for p in (root / "labels").glob("*.txt"))
    labelled = set(names)
    for image in sorted((root / "pngs").glob("*.png")):
        if image.stem not in labelled:
            yield Unlabelled(image.stem, str(image))
    splits = order_split(len(names), GU2NET_FRACTIONS, ("train", "val", "test"))
    for name, split in zip(names, splits, strict=True):
        image, label = root / "pngs" / f"{name}.png", root / "labels" / f"{name}.txt"
        if not image.is_file():
            yield Rejected(name, str(label), "missing_image", f"no image {image}", split)
            continue
        try:
            ratios = parse_ratios(label)
        except BAD_INPUT as exc:
            yield rejected(name, label, exc, split=split)
            continue
        try:
            with open_image(image) as im:
                width, height = displayed_size(im, image)
        except Rejection as exc:
            yield Rejected(name, str(image), exc.reason, exc.detail, split)
            continue
        except Exception as exc:  # noqa: BLE001 - any decoder failure means the same to us
            yield Rejected(name, str(image), "unreadable_image", f"{image}: {exc}", split)
            continue
        points = tuple((rx * width, ry * height) for rx, ry in ratios)
        yield RawSample(name, split, str(image), points, expected_size=(width, height))
