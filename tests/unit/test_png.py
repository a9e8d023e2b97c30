"""Shard PNGs: written with Up-filtered rows, read back by a fast path that must agree with PIL."""
import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from medsapiens.io.imageio import PNG_SIGNATURE, PNG_UP, _png_chunk, decode_png, encode_png, pil_to_array

RNG = np.random.default_rng(0)
IMAGES = {  # heights around the fast decoder's 32-row bands: 3 and a part, 2 and a part, exactly 2, under 1
    "grey8": RNG.integers(0, 256, (101, 29), dtype=np.uint8),
    "grey16": RNG.integers(0, 65536, (70, 33), dtype=np.uint16),
    "rgb": RNG.integers(0, 256, (64, 23, 3), dtype=np.uint8),
    "grey12in16": RNG.integers(0, 4096, (16, 17), dtype=np.uint16),
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


def test_a_stream_that_inflates_past_its_image_is_refused_without_inflating_it_all():
    width, height = 30, 20
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = bytes([PNG_UP]) + bytes(width)
    bomb = zlib.compress(rows * height + bytes(256 * 2**20), 9)  # 256 MiB of zeros past the image
    data = PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", bomb) + _png_chunk(b"IEND", b"")
    tracemalloc.start()
    with pytest.raises(ValueError, match="inflates past the 620 bytes of 30x20"):
        decode_png(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2**20
    exact = PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows * height)) + \
        _png_chunk(b"IEND", b"")
    assert np.array_equal(decode_png(exact), np.zeros((height, width), np.uint8))
    short = zlib.compress(rows * height)[:-4]  # the stream's checksum cut off
    with pytest.raises(ValueError, match="no stream end"):
        decode_png(PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", short) + _png_chunk(b"IEND", b""))
