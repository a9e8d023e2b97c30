import math

import numpy as np
import pytest
import torch

from medsapiens.data.codec import (
    apply_affine,
    decode_udp,
    encode_udp,
    flip_heatmaps,
    heatmap_to_input,
    input_to_heatmap,
    whole_image_affine,
)


def reference_udp_heatmaps(heatmap_size, keypoints, visible, sigma):
    """mmpose's UDP Gaussian generation, written out as the per-keypoint loop it is."""
    w, h = heatmap_size
    k_count = len(keypoints)
    heatmaps = np.zeros((k_count, h, w), dtype=np.float32)
    weights = visible.astype(np.float32).copy()
    radius = sigma * 3
    size = 2 * radius + 1
    xs = np.arange(0, size, 1, dtype=np.float32)
    ys = xs[:, None]
    for k in range(k_count):
        if visible[k] < 0.5:
            continue
        mu = (keypoints[k] + 0.5).astype(np.int64)
        left, top = (mu - radius).astype(np.int64)
        right, bottom = (mu + radius + 1).astype(np.int64)
        if left >= w or top >= h or right < 0 or bottom < 0:
            weights[k] = 0
            continue
        x0 = y0 = size // 2
        x0 += keypoints[k][0] - mu[0]
        y0 += keypoints[k][1] - mu[1]
        gauss = np.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * sigma**2))
        gx1, gx2 = max(0, -left), min(w, right) - left
        gy1, gy2 = max(0, -top), min(h, bottom) - top
        hx1, hx2 = max(0, left), min(w, right)
        hy1, hy2 = max(0, top), min(h, bottom)
        region = heatmaps[k, hy1:hy2, hx1:hx2]
        np.maximum(region, gauss[gy1:gy2, gx1:gx2], out=region)
    return heatmaps, weights


@pytest.mark.parametrize("sigma", [3.0, 2.0, 2.5])
def test_encode_matches_reference_value_for_value(sigma):
    rng = np.random.default_rng(0)
    input_size, heatmap_size = (192, 256), (48, 64)
    kp_in = np.concatenate([
        rng.uniform(0, 191, size=(20, 1)), rng.uniform(0, 255, size=(20, 1))], axis=1)
    # near and beyond every border, including windows that are only partly inside
    kp_in = np.concatenate([kp_in, [[-3, 10], [195, 100], [50, -10], [50, 300], [-60, -60], [0, 0], [191, 255]]])
    visible = np.ones(len(kp_in))
    visible[[1, 5]] = 0
    heat, weights = encode_udp(kp_in, visible, input_size, heatmap_size, sigma)
    kp_hm = (kp_in.astype(np.float32) * ((np.array(heatmap_size) - 1) / (np.array(input_size) - 1)).astype(np.float32))
    ref_heat, ref_weights = reference_udp_heatmaps(heatmap_size, kp_hm, visible, sigma)
    np.testing.assert_array_equal(weights.numpy(), ref_weights)
    np.testing.assert_allclose(heat.numpy(), ref_heat, rtol=0, atol=1e-7)
    assert ref_weights[-3] == 0 and ref_weights[-4] == 0  # windows fully outside
    assert ref_weights[-5] == 1 and ref_heat[-5].max() > 0  # window partly inside


def test_encode_is_batched():
    kp = torch.tensor([[[10.0, 20.0], [100.0, 30.0]], [[5.0, 5.0], [60.0, 200.0]]])
    vis = torch.ones(2, 2)
    heat, weights = encode_udp(kp, vis, (192, 256), (48, 64))
    assert heat.shape == (2, 2, 64, 48) and weights.shape == (2, 2)
    single, _ = encode_udp(kp[1], vis[1], (192, 256), (48, 64))
    assert torch.equal(heat[1], single)


def test_round_trip_subpixel():
    gen = torch.Generator().manual_seed(1)
    hm = (48, 64)
    kp = torch.rand(200, 2, generator=gen) * torch.tensor([30.0, 44.0]) + 9  # away from borders
    heat, _ = encode_udp(kp, torch.ones(200), hm, hm)  # input == heatmap size: identity scaling
    decoded, scores = decode_udp(heat)
    err = (decoded - kp).norm(dim=-1)
    assert err.max() < 0.05, err.max()
    assert scores.min() > 0.95 and scores.max() <= 1.0


def test_round_trip_near_borders_stays_within_a_pixel():
    # DARK's finite differences see a replicated edge there, so sub-pixel accuracy is lost.
    hm = (48, 64)
    kp = torch.tensor([[0.3, 30.0], [47.0, 2.2], [20.0, 63.0]])
    heat, _ = encode_udp(kp, torch.ones(3), hm, hm)
    decoded, _ = decode_udp(heat)
    assert (decoded - kp).norm(dim=-1).max() < 1.0


def test_flat_heatmap_falls_back_to_argmax():
    heat = torch.zeros(1, 64, 48)
    heat[0, 10, 20] = 1.0
    decoded, score = decode_udp(torch.zeros(1, 64, 48))
    assert torch.isfinite(decoded).all()
    decoded, score = decode_udp(heat)
    assert (decoded[0] - torch.tensor([20.0, 10.0])).norm() < 1.0 and score[0] == 1.0


@pytest.mark.parametrize("flip", [False, True])
def test_full_chain_recovers_original_pixels(flip):
    gen = torch.Generator().manual_seed(2)
    image_size, input_size, heatmap_size = (1935, 2400), (192, 256), (48, 64)
    kp_orig = torch.rand(19, 2, generator=gen, dtype=torch.float64) * torch.tensor([1500.0, 2000.0]) + 200
    matrix = whole_image_affine(image_size, input_size, scale=1.1, rotation_deg=12.0, shift=(0.02, -0.03), flip=flip)
    kp_in = apply_affine(matrix, kp_orig)
    heat, weights = encode_udp(kp_in, torch.ones(19), input_size, heatmap_size)
    assert weights.min() == 1
    decoded, _ = decode_udp(heat)
    back = apply_affine(torch.linalg.inv(matrix), heatmap_to_input(decoded, input_size, heatmap_size))
    pixel_scale = math.sqrt(abs(torch.linalg.det(matrix[:2, :2]).item()))  # input px per original px
    bound = 0.05 * (input_size[0] - 1) / (heatmap_size[0] - 1) / pixel_scale
    assert (back - kp_orig).norm(dim=-1).max() < bound


def test_whole_image_affine_fits_image_with_margin():
    m = whole_image_affine((300, 400), (192, 256), margin=1.25)
    corners = torch.tensor([[0.0, 0.0], [299.0, 399.0]])
    mapped = apply_affine(m, corners)
    centre = torch.tensor([(192 - 1) / 2, (256 - 1) / 2], dtype=torch.float64)
    assert torch.allclose(mapped.mean(0), centre)
    assert abs((mapped[1, 1] - mapped[0, 1]) - 399 * 256 / (400 * 1.25)) < 1e-9  # height fills 1/1.25


@pytest.mark.parametrize("image_size", [(2800, 7000), (1000, 1000), (1935, 2400)])
def test_a_shift_moves_the_crop_by_a_fraction_of_the_padded_image_not_of_the_aspect_fixed_box(image_size):
    """mmpose's RandomBBoxTransform moves the centre by shift x the padded box (W, H) x 1.25 before
    TopdownAffine widens the box to 3:4: a tall leg image shifts sideways by its own width's share."""
    (w, h), shift = image_size, (0.1, -0.05)
    still, moved = (whole_image_affine(image_size, (768, 1024), shift=s) for s in ((0.0, 0.0), shift))
    centre = torch.tensor([[(768 - 1) / 2, (1024 - 1) / 2]], dtype=torch.float64)
    centre_before, centre_after = (apply_affine(torch.linalg.inv(m), centre)[0] for m in (still, moved))
    assert torch.allclose(centre_after - centre_before, torch.tensor([0.1 * w * 1.25, -0.05 * h * 1.25],
                                                                     dtype=torch.float64))


def test_flip_matches_encoding_of_mirrored_points():
    input_size, heatmap_size = (192, 256), (48, 64)
    kp = torch.tensor([[40.0, 50.0], [150.0, 60.0], [96.0, 200.0]])
    permutation = [1, 0, 2]  # landmarks 0 and 1 are a left/right pair
    heat, _ = encode_udp(kp, torch.ones(3), input_size, heatmap_size)
    mirrored = kp.clone()
    mirrored[:, 0] = input_size[0] - 1 - kp[:, 0]
    mirrored = mirrored[permutation]  # in the mirrored image, channel 0 shows the other side
    heat_mirrored, _ = encode_udp(mirrored, torch.ones(3), input_size, heatmap_size)
    assert torch.allclose(flip_heatmaps(heat_mirrored, permutation), heat, atol=1e-6)


def test_scaling_inverse():
    pts = torch.tensor([[0.0, 0.0], [191.0, 255.0], [33.3, 77.7]])
    there = input_to_heatmap(pts, (192, 256), (48, 64))
    assert torch.allclose(there[1], torch.tensor([47.0, 63.0]))
    assert torch.allclose(heatmap_to_input(there, (192, 256), (48, 64)).float(), pts, atol=1e-4)


def test_scaling_stays_on_the_points_device():
    """A GPU's points scale on the GPU: the meta device stands for one (mixing it with a CPU tensor raises)."""
    pts = torch.zeros(5, 2, device="meta")
    assert input_to_heatmap(pts, (192, 256), (48, 64)).device == pts.device
    assert heatmap_to_input(pts, (192, 256), (48, 64)).device == pts.device


def test_a_heatmap_holding_nan_or_infinity_decodes_to_nan_not_to_its_argmax():
    heat = torch.zeros(3, 64, 48)
    heat[:, 10, 20] = 1.0
    heat[0, 30, 30] = float("nan")
    heat[1, 5, 5] = float("-inf")  # away from the peak: the argmax alone would not see it
    decoded, _ = decode_udp(heat)
    assert torch.isnan(decoded[:2]).all()
    assert (decoded[2] - torch.tensor([20.0, 10.0])).norm() < 1.0
