"""Drawing landmarks on images: TensorBoard panels, evaluation overlays, contact sheets."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from medsapiens.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

TRUE_COLOR = (40, 220, 60)
PRED_COLOR = (255, 60, 60)
ERROR_COLOR = (255, 210, 0)
BOUND_COLOR = (80, 160, 255)


def to_rgb_uint8(image) -> np.ndarray:
    """A normalised (3, h, w) tensor, or a grey/RGB array on any scale, as an (h, w, 3) uint8 image."""
    if not isinstance(image, np.ndarray) and hasattr(image, "cpu"):  # a torch tensor, without importing torch
        values = image.float().cpu().numpy()
        arr = (values * np.asarray(IMAGENET_STD)[:, None, None] + np.asarray(IMAGENET_MEAN)[:, None, None])
        arr = arr.transpose(1, 2, 0)
    else:
        arr = np.asarray(image, dtype=np.float64)
        if arr.max() > 255:
            arr = arr / arr.max() * 255
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.clip(arr, 0, 255).astype(np.uint8)


def draw_landmarks(image: np.ndarray, truth=None, pred=None, bounds=None) -> np.ndarray:
    """Ground truth in green, predictions in red, a yellow line from each truth to its prediction;
    `bounds` (K, 2): each prediction's conformal radius along x and y in pixels, drawn in blue."""
    canvas = Image.fromarray(to_rgb_uint8(image))
    draw = ImageDraw.Draw(canvas)
    r = max(2.0, min(canvas.size) / 150)
    if bounds is not None and pred is not None:
        for (px, py), (rx, ry) in zip(pred, bounds, strict=True):
            draw.ellipse([px - rx, py - ry, px + rx, py + ry], outline=BOUND_COLOR, width=1)
    if truth is not None and pred is not None:
        for (tx, ty), (px, py) in zip(truth, pred, strict=True):
            draw.line([(tx, ty), (px, py)], fill=ERROR_COLOR, width=max(1, int(r / 2)))
    labelled = truth if truth is not None else pred
    for points, color in ((truth, TRUE_COLOR), (pred, PRED_COLOR)):
        if points is None:
            continue
        for k, (x, y) in enumerate(points):
            draw.ellipse([x - r, y - r, x + r, y + r], outline=color, width=max(1, int(r / 2)))
            if points is labelled:
                draw.text((x + r + 1, y - r - 1), str(k), fill=color)
    return np.asarray(canvas)
