"""Heatmap codec (UDP encoding, DARK-UDP decoding), the whole-image affine, and flip test.

Conventions: positions are (x, y) with pixel centres on integers; sizes are (W, H).
Heatmap coordinates follow UDP: kp_hm = kp_in * (hm_size - 1) / (in_size - 1), so the first and
last pixel centres of the input and of the heatmap coincide.

`encode_udp` reproduces mmpose's UDP heatmap generation (as used by Sapiens pose and MedSapiens)
value for value, including its window arithmetic, but vectorised over keypoints and batches.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medsapiens.data import preprocess


def _as_tensor(x, dtype) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=dtype)


def input_to_heatmap(points, input_size, heatmap_size) -> torch.Tensor:
    """Input-pixel positions -> heatmap pixels (float32, as mmpose computes it)."""
    points = _as_tensor(points, torch.float32)
    factor = torch.tensor(
        [(heatmap_size[0] - 1) / (input_size[0] - 1), (heatmap_size[1] - 1) / (input_size[1] - 1)],
        dtype=torch.float32, device=points.device,
    )
    return points * factor


def heatmap_to_input(points, input_size, heatmap_size) -> torch.Tensor:
    """The exact inverse of `input_to_heatmap`."""
    points = _as_tensor(points, torch.float64)
    factor = torch.tensor(
        [(input_size[0] - 1) / (heatmap_size[0] - 1), (input_size[1] - 1) / (heatmap_size[1] - 1)],
        dtype=torch.float64, device=points.device,
    )
    return points * factor


def encode_udp(keypoints, visible, input_size, heatmap_size, sigma: float = 3.0):
    """UDP Gaussian targets.

    keypoints: (..., K, 2) in input pixels; visible: (..., K), a landmark counts when >= 0.5.
    input_size, heatmap_size: (W, H). Returns (heatmaps (..., K, h, w) float32, weights (..., K)).
    A landmark gets weight 0 when invisible or when its 3-sigma window lies fully outside.
    """
    w, h = heatmap_size
    kp = input_to_heatmap(keypoints, input_size, heatmap_size).to(torch.float64)
    vis = _as_tensor(visible, torch.float32)
    radius = sigma * 3
    gauss_len = math.ceil(2 * radius + 1)
    centre = (2 * radius + 1) // 2
    mu = torch.trunc(kp + 0.5)
    low = torch.trunc(mu - radius)
    high = torch.trunc(mu + radius + 1)
    size = torch.tensor([w, h], dtype=torch.float64)
    outside = ((low >= size) | (high < 0)).any(-1)
    weights = torch.where((vis < 0.5) | outside, torch.zeros_like(vis), vis)
    # Offset of the keypoint inside its Gaussian patch, exactly as the reference computes it.
    offset = centre + kp - mu
    # Only each landmark's window (gauss_len pixels a side, from `low`) can be non-zero: exp is
    # computed there, with the same float64 expressions the whole-map formula used, and scattered.
    steps = torch.arange(gauss_len, dtype=torch.float64)

    def axis_window(axis: int, length: int):
        lo, hi = low[..., axis, None], high[..., axis, None]
        pixels = lo + steps
        inside = (pixels >= 0) & (pixels < length) & (pixels < hi)
        return pixels, (pixels - lo - offset[..., axis, None]) ** 2, inside

    xs, dx2, in_x = axis_window(0, w)
    ys, dy2, in_y = axis_window(1, h)
    window = torch.exp(-(dx2[..., None, :] + dy2[..., :, None]) / (2 * sigma**2))
    mask = in_x[..., None, :] & in_y[..., :, None] & (weights > 0)[..., None, None]
    flat_index = (ys[..., :, None] * w + xs[..., None, :]).long()
    maps = torch.arange(weights.numel()).view(weights.shape)[..., None, None].expand_as(mask)
    heat = torch.zeros(weights.numel(), h * w, dtype=torch.float32)
    heat[maps[mask], flat_index[mask]] = window[mask].to(torch.float32)
    return heat.view(*weights.shape, h, w), weights


def _gaussian_kernel1d(kernel: int, dtype) -> torch.Tensor:
    # OpenCV's default sigma for a given kernel size (what mmpose's DARK blur uses).
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    x = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).to(dtype)


def _blur_keep_max(heatmaps: torch.Tensor, kernel: int) -> torch.Tensor:
    """Gaussian blur with zero padding, each map rescaled to keep its maximum."""
    n, h, w = heatmaps.shape
    k = _gaussian_kernel1d(kernel, heatmaps.dtype).to(heatmaps.device)
    x = heatmaps[:, None]
    x = F.conv2d(F.pad(x, (kernel // 2, kernel // 2, 0, 0)), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, kernel // 2, kernel // 2)), k.view(1, 1, -1, 1))[:, 0]
    orig_max = heatmaps.amax(dim=(1, 2), keepdim=True)
    blur_max = x.amax(dim=(1, 2), keepdim=True)
    return x * torch.where(blur_max > 0, orig_max / blur_max, torch.zeros_like(blur_max))


def decode_udp(heatmaps: torch.Tensor, blur_kernel: int = 11):
    """Argmax + DARK-UDP refinement (blur, log, one Newton step on the 3x3 neighbourhood).

    heatmaps: (..., K, h, w). Returns (keypoints (..., K, 2) in heatmap pixels, scores (..., K)).
    Where the Newton step is not finite (flat or degenerate maps) the argmax is kept; a map holding NaN or
    infinity (a diverged model) gives NaN keypoints, never its argmax's position.
    """
    lead, (h, w) = heatmaps.shape[:-2], heatmaps.shape[-2:]
    maps = heatmaps.detach().reshape(-1, h, w).float()
    scores, flat_idx = maps.flatten(1).max(dim=1)
    ix, iy = flat_idx % w, flat_idx // w
    log_maps = torch.log(_blur_keep_max(maps, blur_kernel).clamp(1e-3, 50.0))
    padded = F.pad(log_maps[:, None], (1, 1, 1, 1), mode="replicate").flatten(1)

    def at(dx: int, dy: int) -> torch.Tensor:
        # a gather on the flattened padded map, not advanced indexing: it exports to ONNX
        index = (iy + 1 + dy) * (w + 2) + (ix + 1 + dx)
        return padded.gather(1, index[:, None])[:, 0].double()

    centre = at(0, 0)
    dx = 0.5 * (at(1, 0) - at(-1, 0))
    dy = 0.5 * (at(0, 1) - at(0, -1))
    dxx = at(1, 0) - 2 * centre + at(-1, 0)
    dyy = at(0, 1) - 2 * centre + at(0, -1)
    dxy = 0.5 * (at(1, 1) - at(1, 0) - at(0, 1) + 2 * centre - at(-1, 0) - at(0, -1) + at(-1, -1))
    eps = torch.finfo(torch.float32).eps
    a, b, d = dxx + eps, dxy, dyy + eps
    det = a * d - b * b
    step_x = (d * dx - b * dy) / det
    step_y = (a * dy - b * dx) / det
    base = torch.stack([ix, iy], dim=-1).double()
    refined = base - torch.stack([step_x, step_y], dim=-1)
    ok = torch.isfinite(refined).all(-1, keepdim=True)
    keypoints = torch.where(ok, refined, base).float()
    # the maps themselves are checked: ONNX's ReduceMax skips NaN where torch's max returns it
    finite = torch.isfinite(maps).flatten(1).all(1)
    keypoints = torch.where(finite[:, None], keypoints, torch.full_like(keypoints, float("nan")))
    return keypoints.reshape(*lead, 2), scores.reshape(lead)


def flip_heatmaps(heatmaps: torch.Tensor, permutation) -> torch.Tensor:
    """Heatmaps of a horizontally flipped input, mapped back onto the unflipped image.

    With UDP, mirroring the input maps heatmap column x to (w - 1 - x), so a plain column reversal
    is exact; channels are reordered by the landmark set's left/right permutation.
    """
    return heatmaps.flip(-1)[..., list(permutation), :, :]


# ----------------------------------------------------------------------------- affine geometry

def whole_image_affine(image_size, input_size, margin: float = 1.25, scale: float = 1.0,
                       rotation_deg: float = 0.0, shift=(0.0, 0.0), flip: bool = False) -> torch.Tensor:
    """3x3 float64 tensor mapping original-image pixels to input pixels (medsapiens.data.preprocess has the rule)."""
    return torch.from_numpy(preprocess.whole_image_affine(image_size, input_size, margin, scale, rotation_deg, shift,
                                                          flip))


def apply_affine(matrix: torch.Tensor, points) -> torch.Tensor:
    """Apply a (..., 3, 3) matrix to (..., K, 2) points."""
    pts = _as_tensor(points, torch.float64)
    m = _as_tensor(matrix, torch.float64)
    return pts @ m[..., :2, :2].transpose(-1, -2) + m[..., None, :2, 2]
