"""The model input of an image, in numpy only: the whole-image affine, the warp, ImageNet normalisation.

torch-free on purpose: `medsapiens predict --onnx` runs on onnxruntime without torch installed, and
this is the preprocessing an exported model documents in its metadata. The training and evaluation
pipeline warps with torch (medsapiens.data.augment.warp); tests hold the two to the same values.

Conventions as in medsapiens.data.codec: positions (x, y) with pixel centres on integers, sizes (W, H).
"""
from __future__ import annotations

import math

import numpy as np

from medsapiens.errors import InputError

MAX_INPUT_SIDE = 8192  # Sapiens2 runs at up to 4K; past this a model's tokens outgrow any GPU
MARGIN_RANGE = (1.0, 4.0)  # the image enlarged by 1.25 in the recipe; below 1 it is cut, far above it a dot
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

DESCRIPTION = (
    "input: float32 (B, 3, H, W), RGB (grey repeated), (value - mean) / std per channel on a 0-255 scale, "
    "values from medsapiens.io.imageio.decode (16-bit divided by 257). The image is placed by the whole-image "
    "affine: the image, padded to the input's aspect ratio and enlarged by `margin`, centred and scaled to fill "
    "the input (s = W_in / (max(W, H * W_in / H_in) * margin); x_in = s * (x - (W - 1) / 2) + (W_in - 1) / 2, "
    "likewise y), pixel centres on integers; sampled bilinearly with zeros outside, after an integer "
    "area-average (factor floor(1 / s)) when s < 0.5. Outputs are in input pixels: invert the affine to get "
    "original pixels.")


def check_margin(key: str, value) -> None:
    low, high = MARGIN_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InputError(f"{key} must be a number from {low:g} to {high:g}, got {value!r:.80}")


def whole_image_affine(image_size, input_size, margin: float = 1.25, scale: float = 1.0,
                       rotation_deg: float = 0.0, shift=(0.0, 0.0), flip: bool = False) -> np.ndarray:
    """3x3 float64 matrix mapping original-image pixels to input pixels.

    The whole image, padded to the input's aspect ratio and enlarged by `margin`, fills the input.
    `scale` > 1 zooms in, `rotation_deg` turns counter-clockwise on screen, `shift` moves the
    crop by that fraction of the image's width and height enlarged by `margin` (mmpose's
    RandomBBoxTransform shifts the padded box before TopdownAffine fixes its aspect ratio), and
    `flip` mirrors horizontally about the input centre.
    """
    (iw, ih), (ow, oh) = image_size, input_size
    box_w = max(iw, ih * ow / oh) * margin
    s = ow / box_w * scale
    cx = (iw - 1) / 2 + shift[0] * iw * margin
    cy = (ih - 1) / 2 + shift[1] * ih * margin
    t = math.radians(rotation_deg)
    cos, sin = math.cos(t), math.sin(t)
    mirror = -1.0 if flip else 1.0
    rot_scale = np.array([[mirror * s * cos, mirror * s * sin], [-s * sin, s * cos]], dtype=np.float64)
    matrix = np.eye(3, dtype=np.float64)
    matrix[:2, :2] = rot_scale
    matrix[:2, 2] = np.array([(ow - 1) / 2, (oh - 1) / 2]) - rot_scale @ np.array([cx, cy])
    return matrix


def apply_affine(matrix: np.ndarray, points) -> np.ndarray:
    """A 3x3 matrix applied to (..., 2) points."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:2, :2].T + matrix[:2, 2]


def warp(image: np.ndarray, matrix: np.ndarray, input_size) -> np.ndarray:
    """An (H, W) or (H, W, C) float image through `matrix` onto a (C, h, w) float32 array.

    Bilinear with zeros outside (each of the four neighbours outside counts 0), after an integer
    area-average when the image is shrunk below half, as medsapiens.data.augment.warp does.
    """
    img = np.asarray(image, dtype=np.float32)
    img = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
    m = np.asarray(matrix, dtype=np.float64)
    pixel_scale = math.sqrt(abs(np.linalg.det(m[:2, :2])))
    factor = int(1.0 / pixel_scale) if pixel_scale < 0.5 else 1
    if factor > 1:
        c, h, w = img.shape
        h, w = h // factor, w // factor
        img = img[:, :h * factor, :w * factor].reshape(c, h, factor, w, factor).mean(axis=(2, 4), dtype=np.float32)
        # pooled pixel j covers source pixels j*f .. j*f+f-1: source x = f*x_p + (f-1)/2
        m = m @ np.array([[factor, 0, (factor - 1) / 2], [0, factor, (factor - 1) / 2], [0, 0, 1]])
    ow, oh = input_size
    ys, xs = np.mgrid[0:oh, 0:ow]
    source = apply_affine(np.linalg.inv(m), np.stack([xs, ys], axis=-1).astype(np.float64))
    return bilinear(img, source[..., 0], source[..., 1])


def bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(C, H, W) sampled at float positions (h, w) -> (C, h, w) float32, zero outside the image."""
    _, height, width = img.shape
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
    out = np.zeros((img.shape[0], *x.shape), dtype=np.float32)
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        out += img[:, np.clip(yi, 0, height - 1), np.clip(xi, 0, width - 1)] * (weight * inside)
    return out


def normalize(img: np.ndarray) -> np.ndarray:
    """0-255 grey or RGB (C, h, w) -> ImageNet-normalised RGB (3, h, w) float32."""
    if img.shape[0] == 1:
        img = np.repeat(img, 3, axis=0)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return ((img - mean) / std).astype(np.float32)


def model_input(image: np.ndarray, input_size, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(normalised (3, H, W) input, its 3x3 affine from original pixels) for an image from imageio."""
    matrix = whole_image_affine((image.shape[1], image.shape[0]), input_size, margin)
    return normalize(warp(image, matrix, input_size)), matrix
