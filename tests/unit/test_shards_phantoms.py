"""Phantoms: deterministic by seed, landmarks on drawn structure, the protocol's special landmarks."""
from __future__ import annotations

import numpy as np
import pytest

from medsapiens.shards.phantoms import SETS, phantom, spread_ids, write_phantoms


def files_of(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_byte_identical_files_and_another_seed_does_not(tmp_path):
    first, second, other = (files_of(write_phantoms(tmp_path / name, n=3, seed=seed)["hand"].parent)
                            for name, seed in (("a", 5), ("b", 5), ("c", 6)))
    assert len(first) > 4 * 3 and first == second
    images = [k for k in first if k.suffix in (".bmp", ".jpg", ".png")]
    assert all(first[k] != other[k] for k in images)


def gradient_near(image: np.ndarray, points, radius: int = 3) -> np.ndarray:
    """The strongest intensity gradient within `radius` px of each point."""
    grad = np.hypot(*np.gradient(image.astype(np.float64)))
    out = []
    for x, y in np.rint(points).astype(int):
        out.append(grad[max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1].max())
    return np.array(out)


@pytest.mark.parametrize("name", SETS)
def test_landmarks_sit_on_structure_not_on_noise(name):
    near_landmarks, near_random = [], []
    for index in range(3):
        image, landmarks, _ = phantom(name, 0, index)
        body = np.argwhere(image > np.percentile(image, 30))  # random points inside the body, not in the air
        picks = body[np.random.default_rng(index).integers(0, len(body), 200)][:, ::-1]
        near_landmarks.append(gradient_near(image, landmarks))
        near_random.append(gradient_near(image, picks))
    at_landmarks, at_random = np.concatenate(near_landmarks), np.concatenate(near_random)
    assert at_landmarks.mean() > 1.5 * at_random.mean()
    assert (at_landmarks > np.median(at_random)).mean() > 0.85


def test_images_look_like_radiographs():
    for name in SETS:
        image, _, _ = phantom(name, 0, 0)
        corners = np.concatenate([image[:8, :8].ravel(), image[-8:, -8:].ravel(), image[:8, -8:].ravel()])
        assert np.median(corners) < 40, f"{name}: the air around the body should be dark"
        assert np.percentile(image, 99.5) > 170, f"{name}: bone rims should be bright"


def test_hand_landmarks_1_and_5_are_the_wrist_extremes():
    for index in range(4):
        _, points, _ = phantom("hand", 0, index)
        radial, ulnar = points[1], points[5]
        axis = (radial - ulnar) / np.linalg.norm(radial - ulnar)
        along = (points[[0, 2, 3, 4]] - ulnar) @ axis
        assert 70 < np.linalg.norm(radial - ulnar) < 140  # about 50 mm at ~0.5 mm/px
        assert (along > 0).all() and (along < np.linalg.norm(radial - ulnar)).all()


def test_leg_landmarks_mirror_across_the_legs():
    for index in range(4):
        image, points, _ = phantom("leg", 0, index)
        width = image.shape[1]
        left, right = points[:13], points[13:]
        assert (left[:, 0] > width / 2).all() and (right[:, 0] < width / 2).all()
        middle = (left + right) / 2  # mirrored pairs: their midpoints lie on the body's midline
        slope, offset = np.polyfit(middle[:, 1], middle[:, 0], 1)
        assert np.abs(middle[:, 0] - (slope * middle[:, 1] + offset)).max() < 10
        np.testing.assert_allclose(left[:, 1], right[:, 1], atol=30)


def test_head_ids_cover_all_three_official_ranges():
    ids = spread_ids(60)
    assert len(ids) == 60 and len({i for _, i in ids}) == 60
    assert [sum(lo <= i <= hi for _, i in ids) for lo, hi in ((1, 150), (151, 300), (301, 400))] == [22, 22, 16]
    assert {folder for folder, _ in spread_ids(3)} == {"TrainingData", "Test1Data", "Test2Data"}
