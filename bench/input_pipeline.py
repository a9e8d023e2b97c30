"""Training samples per CPU-second of our input pipeline against the Sapiens recipe's mmpose one.

    python bench/input_pipeline.py [--images 24] [--samples 96] [--profile]

All sides see the same ISBI-size head images (phantoms upscaled to 1935x2400 with film-grain
noise, written as the ISBI layout in a temp dir) at the real training resolution (768x1024 input,
192x256 heatmaps, default augmentation). Ours reads the head shards built from them at the
default max side 1024 (one process, DataLoader workers=0). The baselines read the full-size files:
- "recipe" runs the Sapiens config's train_pipeline transform by transform: LoadImage (bytes,
  cv2.imdecode, 3-channel BGR), RandomFlip, RandomBBoxTransform, TopdownAffine (UDP,
  cv2.warpAffine), mmpose's PhotometricDistortion (HSV round trip included), albumentations'
  Blur / MedianBlur / CoarseDropout, the per-keypoint UDP heatmap loop and PackPoseInputs'
  image_to_tensor, stacked into a batch. mmengine's per-sample data structures are left out.
  It runs twice on the same draws: "recipe png" reads the images as MedSapiens' data package
  stores them (every image a PNG in data/med_sapien/Images/; here grey PNGs at OpenCV's default
  compression, the quickest of the PNGs tried to decode), "recipe bmp" reads ISBI's original BMPs.
- "lean" is our augmentation done with cv2 calls on uint8 (the BMPs, the same geometry, one
  brightness/contrast conversion, no HSV round trip, median kernels 3/5/7 as ours, the hole by
  hand): a floor, not what anyone runs.
The sides run interleaved, one micro-batch each in turn, all on one thread, and each is charged
the process CPU time of its own turns, so other load on the machine matters little. `--profile`
also prints where each side's time goes (cProfile).

Needs the bench extra (`pip install -e '.[bench]'`: opencv-python-headless and albumentations,
for the baselines).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import would ask PyPI for a newer version
import albumentations as A  # noqa: E402
import cv2
import numpy as np
import torch
from PIL import Image
from scipy.stats import truncnorm

from medsapiens.data.pipeline import DataConfig, TrainStream
from medsapiens.io import manifest as manifestlib
from medsapiens.shards.build import BuildOptions, build
from medsapiens.shards.phantoms import write_head
from medsapiens.shards.plan import SourceSpec
from medsapiens.shards.readers.isbi2015 import annotation_path, parse_points

ISBI_SIZE = (1935, 2400)  # (W, H) of the ISBI 2015 cephalograms
INPUT_SIZE = (768, 1024)
HEATMAP_SIZE = (192, 256)
SIGMA = 3.0
MICRO_BATCH = 4


def isbi_size_images(root: Path, n: int) -> list[tuple[Path, np.ndarray]]:
    """Head phantoms upscaled to ISBI size (annotations moved with them); [(bmp, landmarks)]."""
    write_head(root, n, seed=0)
    rng = np.random.default_rng(0)
    items = []
    for bmp in sorted(root.glob("RawImage/*/*.bmp")):
        small = Image.open(bmp)
        factor = np.array(ISBI_SIZE) / small.size
        big = np.asarray(small.resize(ISBI_SIZE, Image.Resampling.BICUBIC), dtype=np.float32)
        grain = rng.normal(0, 3.0, big.shape).astype(np.float32)  # real films are not smooth: PNG sizes stay honest
        Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8)).save(bmp)
        for who in ("senior", "junior"):
            note = annotation_path(root, who, bmp.stem)
            points = (np.array(parse_points(note, 19)) + 0.5) * factor - 0.5
            note.write_text("".join(f"{round(x)},{round(y)}\n" for x, y in points))
        items.append((bmp, (np.array(parse_points(annotation_path(root, "senior", bmp.stem), 19)) +
                            np.array(parse_points(annotation_path(root, "junior", bmp.stem), 19))) / 2))
    return items


def as_png_package(items, images: Path) -> list[tuple[Path, np.ndarray]]:
    """The same images as PNGs in one Images/ folder, as MedSapiens' data package stores them."""
    images.mkdir(parents=True)
    pngs = []
    for bmp, landmarks in items:
        png = images / f"Head_{bmp.stem}.png"
        cv2.imwrite(str(png), cv2.imread(str(bmp), cv2.IMREAD_GRAYSCALE))
        pngs.append((png, landmarks))
    return pngs


# ------------------------------------------------------------------ the baselines

def udp_warp_matrix(center, box_size, rotation_deg, output_size) -> np.ndarray:
    """mmpose's UDP affine (2x3): the box around `center` onto the output, pixel centres aligned."""
    theta = math.radians(rotation_deg)
    scale_x = (output_size[0] - 1) / box_size[0]
    scale_y = (output_size[1] - 1) / box_size[1]
    cos, sin = math.cos(theta), math.sin(theta)
    return np.array([
        [cos * scale_x, -sin * scale_x,
         scale_x * (-center[0] * cos + center[1] * sin + 0.5 * box_size[0])],
        [sin * scale_y, cos * scale_y,
         scale_y * (-center[0] * sin - center[1] * cos + 0.5 * box_size[1])],
    ], dtype=np.float32)


def udp_heatmaps_loop(keypoints: np.ndarray, sigma: float) -> np.ndarray:
    """One Gaussian patch per keypoint, as mmpose's generate_udp_gaussian_heatmaps does it."""
    w, h = HEATMAP_SIZE
    heatmaps = np.zeros((len(keypoints), h, w), dtype=np.float32)
    radius = sigma * 3
    size = 2 * radius + 1
    grid = np.arange(0, size, 1, dtype=np.float32)
    for k, (x, y) in enumerate(keypoints):
        mu = (np.array([x, y]) + 0.5).astype(np.int64)
        left, top = (mu - radius).astype(np.int64)
        right, bottom = (mu + radius + 1).astype(np.int64)
        if left >= w or top >= h or right < 0 or bottom < 0:
            continue
        x0 = size // 2 + x - mu[0]
        y0 = size // 2 + y - mu[1]
        gaussian = np.exp(-((grid[None, :] - x0) ** 2 + (grid[:, None] - y0) ** 2) / (2 * sigma**2))
        gx0, gy0 = max(0, -left), max(0, -top)
        gx1, gy1 = min(right, w) - left, min(bottom, h) - top
        hx0, hy0, hx1, hy1 = max(0, left), max(0, top), min(right, w), min(bottom, h)
        heatmaps[k, hy0:hy1, hx0:hx1] = gaussian[gy0:gy1, gx0:gx1]
    return heatmaps


def truncated_normal(rng, size=()) -> np.ndarray:
    """RandomBBoxTransform's draw: scipy's truncnorm on [-1, 1]."""
    return truncnorm.rvs(-1.0, 1.0, size=size, random_state=rng).astype(np.float32)


def load_and_warp(path: Path, landmarks: np.ndarray, rng: np.random.Generator):
    """mmpose's LoadImage (file bytes, cv2.imdecode as 3-channel BGR), RandomFlip,
    RandomBBoxTransform and TopdownAffine (UDP, cv2.warpAffine): the image and its keypoints."""
    image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    h, w = image.shape[:2]
    points = landmarks.copy()
    if rng.random() < 0.5:
        image = cv2.flip(image, 1)
        points[:, 0] = w - 1 - points[:, 0]
    aspect = INPUT_SIZE[0] / INPUT_SIZE[1]
    box = np.array([max(w, h * aspect), max(w, h * aspect) / aspect]) * 1.25
    offset = truncated_normal(rng, 2) * 0.16 if rng.random() < 0.3 else 0.0
    center = np.array([w / 2, h / 2]) + offset * box
    box *= truncated_normal(rng) * 0.5 + 1.0
    rotation = float(truncated_normal(rng)) * 80 if rng.random() < 0.6 else 0.0
    matrix = udp_warp_matrix(center, box, rotation, INPUT_SIZE)
    image = cv2.warpAffine(image, matrix, INPUT_SIZE, flags=cv2.INTER_LINEAR)
    return image, points @ matrix[:, :2].T + matrix[:, 2]


def convert(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmpose's PhotometricDistortion with its defaults, as the Sapiens config runs it: brightness,
    a BGR->HSV->BGR round trip for saturation / hue (3 times in 4), a channel shuffle, and contrast
    both before and after the round trip when its mode is 1 (both of mmpose's tests read
    `contrast_mode == 1`: contrast is applied twice or not at all), each step back to uint8."""
    contrast_mode, brightness, contrast = rng.integers(2), rng.integers(2), rng.integers(2)
    hsv_mode, swap = rng.integers(4), rng.integers(2)
    beta, alpha, saturation = rng.uniform(-32, 32), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)
    hue, order = int(rng.integers(-18, 18)), rng.permutation(3)
    if brightness:
        image = convert(image, beta=beta)
    if contrast and contrast_mode == 1:
        image = convert(image, alpha=alpha)
    if hsv_mode:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        if hsv_mode in (1, 3):
            image[:, :, 1] = convert(image[:, :, 1], alpha=saturation)
        if hsv_mode in (2, 3):
            image[:, :, 0] = image[:, :, 0].astype(int) + hue
        image = cv2.cvtColor(image, cv2.COLOR_HSV2BGR)
    if contrast and contrast_mode == 1:
        image = convert(image, alpha=alpha)
    return image[..., order] if swap else image


def recipe_albumentations(seed: int) -> A.Compose:
    """The Sapiens config's Albumentation step (Blur p 0.1, MedianBlur p 0.1, one CoarseDropout
    hole of 20-40% of each side), in albumentations 2's argument names."""
    return A.Compose([A.Blur(p=0.1), A.MedianBlur(p=0.1),
                      A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(0.2, 0.4),
                                      hole_width_range=(0.2, 0.4), fill=0, p=1.0)], seed=seed)


def pack(image: np.ndarray, points: np.ndarray) -> dict:
    """GenerateTarget (UDP heatmaps) and PackPoseInputs' image_to_tensor."""
    scale = (np.array(HEATMAP_SIZE) - 1) / (np.array(INPUT_SIZE) - 1)
    return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "heatmaps": torch.from_numpy(udp_heatmaps_loop(points * scale, SIGMA))}


def recipe_sample(path: Path, landmarks: np.ndarray, rng: np.random.Generator, albumentations: A.Compose) -> dict:
    """The Sapiens config's train_pipeline, transform by transform (mmengine's data structures left out)."""
    image, points = load_and_warp(path, landmarks, rng)
    image = albumentations(image=photometric_distortion(image, rng))["image"]
    return pack(image, points)


def lean_sample(path: Path, landmarks: np.ndarray, rng: np.random.Generator) -> dict:
    """Our augmentation done with cv2 calls on uint8: one brightness/contrast conversion (p 0.5),
    no HSV round trip, box blur and median blur 3/5/7 (p 0.1 each), the hole by hand."""
    image, points = load_and_warp(path, landmarks, rng)
    if rng.random() < 0.5:
        image = convert(image, alpha=rng.uniform(0.5, 1.5), beta=rng.uniform(-32, 32))
    if rng.random() < 0.1:
        k = int(rng.choice([3, 5, 7]))
        image = cv2.blur(image, (k, k))
    if rng.random() < 0.1:
        image = cv2.medianBlur(image, int(rng.choice([3, 5, 7])))
    hh, ww = (int(s * rng.uniform(0.2, 0.4)) for s in image.shape[:2])
    y, x = int(rng.integers(0, image.shape[0] - hh + 1)), int(rng.integers(0, image.shape[1] - ww + 1))
    image[y:y + hh, x:x + ww] = 0
    return pack(image, points)


def baseline_batches(items, recipe: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    albumentations = recipe_albumentations(seed)
    while True:
        picked = [items[i] for i in rng.integers(0, len(items), MICRO_BATCH)]
        samples = [recipe_sample(path, marks, rng, albumentations) if recipe else lean_sample(path, marks, rng)
                   for path, marks in picked]
        yield {"images": torch.stack([s["image"] for s in samples]),
               "heatmaps": torch.stack([s["heatmaps"] for s in samples])}


# ------------------------------------------------------------------ ours, and the measurement

def our_batches(shards: Path):
    manifest = manifestlib.load(shards)
    cfg = DataConfig(shards=str(shards), micro_batch=MICRO_BATCH, workers=0, sigma=SIGMA)
    return iter(TrainStream(manifest, cfg, ["head"], INPUT_SIZE, seed=0, rank=0))


def interleaved(sides: dict, batches: int) -> dict[str, float]:
    """Samples per CPU-second of each side, taking one micro-batch from each in turn."""
    cpu = dict.fromkeys(sides, 0.0)
    for stream in sides.values():  # warm-up: first-call costs, the shuffle buffer's fill
        next(stream)
    for _ in range(batches):
        for name, stream in sides.items():
            start = time.process_time()
            next(stream)
            cpu[name] += time.process_time() - start
    return {name: batches * MICRO_BATCH / seconds for name, seconds in cpu.items()}


def profile(stream, batches: int, top: int = 14) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(batches):
        next(stream)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="ISBI-size head images to generate")
    parser.add_argument("--samples", type=int, default=96, help="samples measured on each side")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of each side")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(prefix="input-bench-") as tmp:
        items = isbi_size_images(Path(tmp, "head"), args.images)
        build([SourceSpec("head", str(Path(tmp, "head")))],
              BuildOptions(out=str(Path(tmp, "shards")), max_side=1024, shard_size=8, workers=1, progress=False))
        pngs = as_png_package(items, Path(tmp, "med_sapien", "Images"))
        batches = max(1, args.samples // MICRO_BATCH)
        sides = {"ours": lambda: our_batches(Path(tmp, "shards")),
                 "recipe png": lambda: baseline_batches(pngs, recipe=True),
                 "recipe bmp": lambda: baseline_batches(items, recipe=True),
                 "lean": lambda: baseline_batches(items, recipe=False)}
        rates = interleaved({name: make() for name, make in sides.items()}, batches)
        print(f"{len(items)} images {ISBI_SIZE[0]}x{ISBI_SIZE[1]}, shards at max side 1024; input "
              f"{INPUT_SIZE[0]}x{INPUT_SIZE[1]}, heatmaps {HEATMAP_SIZE[0]}x{HEATMAP_SIZE[1]}; "
              f"{batches * MICRO_BATCH} samples a side, micro-batch {MICRO_BATCH}, one thread")
        print("samples per CPU-second: " + ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()))
        print("ours / side: " + ", ".join(f"{name} {rates['ours'] / rate:.2f}"
                                           for name, rate in rates.items() if name != "ours"))
        if args.profile:
            for name, make in sides.items():
                print(f"{name}:", profile(make(), batches))

if __name__ == "__main__":
    main()
