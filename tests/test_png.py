"""Shard PNGs: written with Up-filtered rows, read back by a fast path that must agree with PIL."""
import io

import numpy as np
import pytest
from PIL import Image

from medsapiens.imageio import decode_png, encode_png, pil_to_array

RNG = np.random.default_rng(0)
IMAGES = {
    "grey8": RNG.integers(0, 256, (37, 29), dtype=np.uint8),
    "grey16": RNG.integers(0, 65536, (21, 33), dtype=np.uint16),
    "grey12in16": RNG.integers(0, 4096, (16, 17), dtype=np.uint16),
    "rgb": RNG.integers(0, 256, (19, 23, 3), dtype=np.uint8),
    "one_pixel": np.full((1, 1), 7, dtype=np.uint8),
}


def with_pil(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return pil_to_array(image, "test")


@pytest.mark.parametrize("name", IMAGES)
def test_our_pngs_are_standard_and_read_back_exactly(name):
    pixels = IMAGES[name]
    data = encode_png(pixels)
    assert np.array_equal(with_pil(data), pixels)  # any PNG reader sees the same image
    decoded = decode_png(data)
    assert decoded.dtype == pixels.dtype and np.array_equal(decoded, pixels)


@pytest.mark.parametrize("name", IMAGES)
def test_pngs_written_by_others_are_read_through_pil(name):
    buffer = io.BytesIO()
    Image.fromarray(IMAGES[name]).save(buffer, format="PNG")  # adaptive filters: not the fast path
    assert np.array_equal(decode_png(buffer.getvalue()), IMAGES[name])


def test_damaged_and_oversized_pngs_are_refused_naming_why():
    data = encode_png(IMAGES["grey8"])
    with pytest.raises(ValueError, match="truncated"):
        decode_png(data[:-5])  # into the IEND chunk
    flipped = bytearray(data)
    flipped[50] ^= 1
    with pytest.raises(ValueError, match="CRC"):
        decode_png(bytes(flipped))
    with pytest.raises(ValueError, match="over the shards' max side 30"):
        decode_png(data, max_side=30)
