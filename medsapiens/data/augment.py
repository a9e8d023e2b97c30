"""Image + landmark transforms: the Sapiens recipe's whole-image affine and photometric changes.

Everything here is a pure function of its inputs and a numpy Generator, so a stream seeded the
same way produces the same tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medsapiens import preprocess
from medsapiens.codec import whole_image_affine

IMAGENET_MEAN = torch.tensor(preprocess.IMAGENET_MEAN).view(3, 1, 1)
IMAGENET_STD = torch.tensor(preprocess.IMAGENET_STD).view(3, 1, 1)


@dataclass
class AugmentConfig:
    margin: float = 1.25
    scale_range: tuple[float, float] = (0.5, 1.5)
    rotation_deg: float = 80.0
    rotation_prob: float = 0.6
    shift: float = 0.16
    shift_prob: float = 0.3
    flip_prob: float = 0.5
    brightness: float = 32.0
    contrast: tuple[float, float] = (0.5, 1.5)
    photometric_prob: float = 0.5
    blur_prob: float = 0.1
    median_blur_prob: float = 0.1
    dropout_prob: float = 1.0
    dropout_size: tuple[float, float] = (0.2, 0.4)


def _truncated_normal(rng: np.random.Generator) -> float:
    """A standard normal draw truncated to [-1, 1] (how mmpose samples bbox jitter)."""
    while True:
        v = rng.standard_normal()
        if -1.0 <= v <= 1.0:
            return float(v)


def random_affine(rng: np.random.Generator, image_size, input_size, cfg: AugmentConfig, can_flip: bool):
    """Draw the training affine for one sample; returns (matrix 3x3, flipped?)."""
    lo, hi = cfg.scale_range
    # A larger box means zooming out: scale the box by s, i.e. the image by 1/s.
    box_scale = (hi + lo) / 2 + _truncated_normal(rng) * (hi - lo) / 2
    rotation = _truncated_normal(rng) * cfg.rotation_deg if rng.random() < cfg.rotation_prob else 0.0
    shift = (0.0, 0.0)
    if rng.random() < cfg.shift_prob:
        shift = (_truncated_normal(rng) * cfg.shift, _truncated_normal(rng) * cfg.shift)
    flip = can_flip and rng.random() < cfg.flip_prob
    matrix = whole_image_affine(image_size, input_size, cfg.margin, 1.0 / box_scale, rotation, shift, flip)
    return matrix, flip


def warp(image: np.ndarray, matrix: torch.Tensor, input_size) -> torch.Tensor:
    """Resample an (H, W) or (H, W, C) float image through `matrix` onto an (C, h, w) tensor.

    Bilinear sampling with zero (air) outside. A strong downscale is first area-averaged by an
    integer factor so that the sampling does not alias.
    """
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    img = img[None] if img.ndim == 2 else img.permute(2, 0, 1)
    m = matrix.clone()
    pixel_scale = float(torch.linalg.det(m[:2, :2]).abs().sqrt())
    factor = int(1.0 / pixel_scale) if pixel_scale < 0.5 else 1
    if factor > 1:
        img = F.avg_pool2d(img[None], factor)[0]
        # pooled pixel j covers source pixels j*f .. j*f+f-1: source x = f*x_p + (f-1)/2
        pool = torch.tensor([[factor, 0, (factor - 1) / 2], [0, factor, (factor - 1) / 2], [0, 0, 1]],
                            dtype=torch.float64)
        m = m @ pool
    c, h, w = img.shape
    ow, oh = input_size
    # affine_grid works in [-1, 1] coordinates (align_corners=True: -1 and 1 are the first and last
    # pixel centres): theta = to_unit(source) . inverse(m) . from_unit(output).
    theta = _to_unit(w, h) @ torch.linalg.inv(m) @ torch.linalg.inv(_to_unit(ow, oh))
    grid = F.affine_grid(theta[None, :2].float(), [1, c, oh, ow], align_corners=True)
    return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def _to_unit(w: int, h: int) -> torch.Tensor:
    """Pixel coordinates (centres on integers) -> [-1, 1] across the image."""
    sx, sy = 2 / max(w - 1, 1), 2 / max(h - 1, 1)
    return torch.tensor([[sx, 0, -1], [0, sy, -1], [0, 0, 1]], dtype=torch.float64)


def _box_blur(img: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(img[None], (k // 2,) * 4, mode="replicate"), k, stride=1)[0]


def _median_blur(img: torch.Tensor, k: int) -> torch.Tensor:
    patches = F.unfold(F.pad(img[None], (k // 2,) * 4, mode="replicate"), k)
    return patches.view(img.shape[0], k * k, -1).median(dim=1).values.view_as(img)


def photometric(img: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Brightness, contrast, blur, median blur and one coarse dropout hole, on 0-255 values."""
    if rng.random() < cfg.photometric_prob:
        img = img + rng.uniform(-cfg.brightness, cfg.brightness)
    if rng.random() < cfg.photometric_prob:
        mean = img.mean()
        img = (img - mean) * rng.uniform(*cfg.contrast) + mean
    if rng.random() < cfg.blur_prob:
        img = _box_blur(img, int(rng.choice([3, 5, 7])))
    if rng.random() < cfg.median_blur_prob:
        img = _median_blur(img, int(rng.choice([3, 5])))
    if rng.random() < cfg.dropout_prob:
        _, h, w = img.shape
        hh = int(h * rng.uniform(*cfg.dropout_size))
        ww = int(w * rng.uniform(*cfg.dropout_size))
        y, x = int(rng.integers(0, h - hh + 1)), int(rng.integers(0, w - ww + 1))
        img = img.clone()
        img[:, y:y + hh, x:x + ww] = 0
    return img.clamp(0, 255)


def normalize(img: torch.Tensor) -> torch.Tensor:
    """0-255 grey or RGB (C, h, w) -> ImageNet-normalised RGB (3, h, w)."""
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return (img - IMAGENET_MEAN) / IMAGENET_STD
