"""Image + landmark transforms: the Sapiens recipe's whole-image affine and photometric changes.

Everything here is a pure function of its inputs and a numpy Generator, so a stream seeded the
same way produces the same tensors.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from medsapiens.config import ABOVE_ZERO
from medsapiens.data import preprocess
from medsapiens.data.codec import whole_image_affine
from medsapiens.errors import InputError

IMAGENET_MEAN = torch.tensor(preprocess.IMAGENET_MEAN).view(3, 1, 1)
IMAGENET_STD = torch.tensor(preprocess.IMAGENET_STD).view(3, 1, 1)
BLUR_KERNELS = (3, 5, 7)  # the sizes the recipe's albumentations Blur and MedianBlur draw from


@dataclass
class AugmentConfig:
    # a size drawn only with its probability above 0
    APPLIES_WHEN: ClassVar = {"rotation_deg": ("rotation_prob", ABOVE_ZERO), "shift": ("shift_prob", ABOVE_ZERO),
                              "brightness": ("photometric_prob", ABOVE_ZERO), "contrast": ("photometric_prob", ABOVE_ZERO),
                              "dropout_size": ("dropout_prob", ABOVE_ZERO)}

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

    def check(self) -> None:
        for key in ("rotation_prob", "shift_prob", "flip_prob", "photometric_prob", "blur_prob", "median_blur_prob",
                    "dropout_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise InputError(f"data.augment.{key} is a probability, in [0, 1]; got {getattr(self, key)}")
        for key in ("rotation_deg", "shift", "brightness"):
            if not getattr(self, key) >= 0:
                raise InputError(f"data.augment.{key} must be at least 0, got {getattr(self, key)}")
        preprocess.check_margin("data.augment.margin", self.margin)
        for key, top in (("scale_range", math.inf), ("contrast", math.inf), ("dropout_size", 1.0)):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= top:
                raise InputError(f"data.augment.{key} must be [low, high] with 0 < low <= high"
                                 f"{' <= 1' if top == 1 else ''}, got {[lo, hi]}")


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
    _, h, w = img.shape
    ow, oh = input_size
    inverse = torch.linalg.inv(m)
    if m[0, 1] == 0 and m[1, 0] == 0:
        return _warp_axis_aligned(img, inverse, ow, oh)
    # affine_grid works in [-1, 1] coordinates (align_corners=True: -1 and 1 are the first and last
    # pixel centres): theta = to_unit(source) . inverse(m) . from_unit(output).
    theta = _to_unit(w, h) @ inverse @ torch.linalg.inv(_to_unit(ow, oh))
    return F.grid_sample(img[None], _sampling_grid(theta[:2].float(), ow, oh), mode="bilinear",
                         padding_mode="zeros", align_corners=True)[0]


def _warp_axis_aligned(img: torch.Tensor, inverse: torch.Tensor, ow: int, oh: int) -> torch.Tensor:
    """The bilinear warp of an affine without rotation (every evaluation, 40% of training samples)
    as two 1-D interpolations, rows then columns: grid_sample's values in 80% of its time."""
    _, h, w = img.shape
    padded = F.pad(img, (1, 1, 1, 1))  # one zero pixel around: a tap outside the image reads 0
    top, bottom, fy = _taps(inverse[1, 1], inverse[1, 2], oh, h)
    left, right, fx = _taps(inverse[0, 0], inverse[0, 2], ow, w)
    rows = torch.lerp(padded.index_select(1, top), padded.index_select(1, bottom), fy[:, None])
    rows = rows.view(-1, w + 2)  # 2-D: index_select along its last dim is 4x faster than along a 3-D one's
    return torch.lerp(rows.index_select(1, left), rows.index_select(1, right), fx).view(-1, oh, ow)


def _taps(scale: torch.Tensor, offset: torch.Tensor, n_out: int, n_in: int):
    """Along one axis, for output pixels 0..n_out-1 at source scale * i + offset: the indices of the
    two padded-source pixels either side and the second one's weight."""
    source = (torch.arange(n_out, dtype=torch.float64) * scale + offset).clamp_(-1, n_in)
    first = source.floor()
    index = first.long() + 1  # the padded image starts one pixel early
    return index, (index + 1).clamp_(max=n_in + 1), (source - first).float()


def _sampling_grid(theta: torch.Tensor, ow: int, oh: int) -> torch.Tensor:
    """F.affine_grid(theta, align_corners=True)'s (1, oh, ow, 2) grid, as one broadcast sum per
    coordinate written in place: 0.6 ms against its 8 ms at 768x1024 (it multiplies a (oh*ow, 3)
    matrix)."""
    xs, ys = torch.linspace(-1, 1, ow), torch.linspace(-1, 1, oh)[:, None]
    grid = torch.empty(1, oh, ow, 2)
    for axis in (0, 1):
        torch.add(xs * theta[axis, 0], ys * theta[axis, 1] + theta[axis, 2], out=grid[0, ..., axis])
    return grid


def _to_unit(w: int, h: int) -> torch.Tensor:
    """Pixel coordinates (centres on integers) -> [-1, 1] across the image."""
    sx, sy = 2 / max(w - 1, 1), 2 / max(h - 1, 1)
    return torch.tensor([[sx, 0, -1], [0, sy, -1], [0, 0, 1]], dtype=torch.float64)


def _edge_padded(img: np.ndarray, k: int) -> np.ndarray:
    """(C, H, W) -> (C, H + k - 1, W + k - 1), edges replicated: the input of a k x k filter."""
    r = k // 2
    return np.pad(img, ((0, 0), (r, r), (r, r)), mode="edge")


def _box_blur(img: torch.Tensor, k: int) -> torch.Tensor:
    """k x k mean with replicated edges, as two passes of k shifted sums: 5-10x faster than
    avg_pool2d's k*k window on one thread."""
    _, h, w = img.shape
    padded = _edge_padded(img.numpy(), k)
    rows = padded[:, :, :w].copy()
    for dx in range(1, k):
        rows += padded[:, :, dx:dx + w]
    out = rows[:, :h].copy()
    for dy in range(1, k):
        out += rows[:, dy:dy + h]
    out *= 1.0 / (k * k)
    return torch.from_numpy(out)


MEDIAN_BLOCK_ROWS = 64  # a band of rows at a time: each min/max then works in the CPU's cache


def _median_blur(img: torch.Tensor, k: int) -> torch.Tensor:
    """k x k median with replicated edges of the image rounded to 0..255, as the recipe's uint8
    median: a selection network of elementwise min/max over the k*k shifted views (exact: the
    median is one of the inputs). Rounding and clamping commute with the median, so this is the
    float median rounded, at a third of the float32 network's cost."""
    _, h, w = img.shape
    padded = _edge_padded(img.numpy().clip(0, 255).round().astype(np.uint8), k)
    out = np.empty((img.shape[0], h, w), dtype=np.uint8)
    for y in range(0, h, MEDIAN_BLOCK_ROWS):
        rows = min(MEDIAN_BLOCK_ROWS, h - y)
        out[:, y:y + rows] = _select_median([padded[:, y + dy:y + dy + rows, dx:dx + w]
                                             for dy in range(k) for dx in range(k)])
    return torch.from_numpy(out.astype(np.float32))


@functools.lru_cache(maxsize=None)
def _median_network(n: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """Batcher's odd-even merge sort on the next power of two, pruned to the comparators that the
    middle output depends on: (low wire, high wire, low needed, high needed)."""
    size = 1 << (n - 1).bit_length()
    comparators, p = [], 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                comparators += [(i + j, i + j + k) for i in range(k) if (i + j) // (2 * p) == (i + j + k) // (2 * p)]
            k //= 2
        p *= 2
    needed, kept = {n // 2}, []
    for lo, hi in reversed(comparators):
        if lo in needed or hi in needed:
            kept.append((lo, hi, lo in needed, hi in needed))
            needed |= {lo, hi}
    return tuple(reversed(kept))


def _select_median(values: list[np.ndarray]) -> np.ndarray:
    """Elementwise median of an odd number of equal-shape arrays; the wires past them hold +inf
    (None), so comparators that meet one only move a value."""
    wires = list(values) + [None] * ((1 << (len(values) - 1).bit_length()) - len(values))
    for lo, hi, want_lo, want_hi in _median_network(len(values)):
        a, b = wires[lo], wires[hi]
        if a is None or b is None:
            wires[lo], wires[hi] = (b if a is None else a), None
            continue
        wires[lo] = np.minimum(a, b) if want_lo else None
        wires[hi] = np.maximum(a, b) if want_hi else None
    return wires[len(values) // 2]


def photometric(img: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Brightness, contrast, blur, median blur and one coarse dropout hole, on 0-255 values.

    Works on one copy of `img` in place: the same values as out-of-place arithmetic, without a new
    1024x768 buffer per step."""
    img = img.clone()
    if rng.random() < cfg.photometric_prob:
        img.add_(rng.uniform(-cfg.brightness, cfg.brightness))
    if rng.random() < cfg.photometric_prob:
        mean = img.mean()
        img.sub_(mean).mul_(rng.uniform(*cfg.contrast)).add_(mean)
    if rng.random() < cfg.blur_prob:
        img = _box_blur(img, int(rng.choice(BLUR_KERNELS)))
    if rng.random() < cfg.median_blur_prob:
        img = _median_blur(img, int(rng.choice(BLUR_KERNELS)))
    if rng.random() < cfg.dropout_prob:
        _, h, w = img.shape
        hh = int(h * rng.uniform(*cfg.dropout_size))
        ww = int(w * rng.uniform(*cfg.dropout_size))
        y, x = int(rng.integers(0, h - hh + 1)), int(rng.integers(0, w - ww + 1))
        img[:, y:y + hh, x:x + ww] = 0
    return img.clamp_(0, 255)


def normalize(img: torch.Tensor) -> torch.Tensor:
    """0-255 grey or RGB (..., C, h, w) -> ImageNet-normalised RGB (..., 3, h, w), on img's device
    (training batches travel as one grey channel and are normalised there, after the copy)."""
    if img.shape[-3] == 1:
        img = img.expand(*img.shape[:-3], 3, *img.shape[-2:])
    mean, std = mean_and_std_on(img.device)
    return (img - mean) / std


@functools.lru_cache(maxsize=None)
def mean_and_std_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Copied to a GPU once per process: a copy from pageable memory waits for the GPU's queue, which a
    copy per micro-batch would make the CPU do at every step."""
    return IMAGENET_MEAN.to(device), IMAGENET_STD.to(device)
