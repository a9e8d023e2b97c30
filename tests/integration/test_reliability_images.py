"""No image file exhausts memory: its declared size is checked against a pixel bound
(MEDSAPIENS_MAX_PIXELS, 64 megapixels by default) from the header, before any pixel is read or
decoded, for PNG/JPEG/TIFF through PIL and for DICOM, compressed or not."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import REPO, run, write_dicom
from PIL import Image

# decode() in a child: its exit status, its error line and its peak resident memory in MiB (VmHWM:
# unlike ru_maxrss, which Linux carries over from the forked parent, it starts afresh at exec)
DECODE = ("import json, sys\nfrom medsapiens.io.imageio import decode\nfrom medsapiens.io.record import Rejection\n"
          "try:\n    shape, error = list(decode(sys.argv[1]).shape), None\n"
          "except Rejection as exc:\n    shape, error = None, f'{exc.reason}: {exc.detail}'\n"
          "peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
          "print(json.dumps({'shape': shape, 'error': error, 'peak_mib': int(peak.split()[1]) / 1024}))")


def decode_in_child(path, **env) -> dict:
    proc = run([sys.executable, "-c", DECODE, str(path)], 120, env={"PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def huge_dicom(path):
    """A DICOM declaring 19999 x 19999 16-bit pixels (800 MB decoded) around a few bytes of pixel data."""
    return write_dicom(path, 19999, 19999, bytes(64))


@pytest.mark.timeout(180)
def test_an_image_over_the_pixel_bound_is_refused_before_decoding(tmp_path):
    png = tmp_path / "big.png"
    Image.new("L", (14000, 13000)).save(png)  # 182 megapixels in ~180 KB: past PIL's own bound of 179
    assert png.stat().st_size < 1_000_000
    dicom = huge_dicom(tmp_path / "big.dcm")
    for path, size in ((png, "14000x13000 px is 182 megapixels"), (dicom, "19999x19999 px is 400 megapixels")):
        refused = decode_in_child(path)
        assert refused["shape"] is None and refused["peak_mib"] < 1024
        assert refused["error"].startswith(f"absurd_image_size: {path}: {size}, over the 64 decoded at most "
                                           "(set MEDSAPIENS_MAX_PIXELS to allow more)")
    allowed = decode_in_child(png, MEDSAPIENS_MAX_PIXELS="200000000")  # the setting lifts PIL's bound too
    assert allowed["shape"] == [13000, 14000] and allowed["error"] is None


def test_a_bad_pixel_bound_setting_is_named(tmp_path, monkeypatch):
    from medsapiens.errors import InputError
    from medsapiens.io.imageio import decode

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(path)
    monkeypatch.setenv("MEDSAPIENS_MAX_PIXELS", "lots")
    with pytest.raises(InputError, match="MEDSAPIENS_MAX_PIXELS='lots': must be a whole number of pixels"):
        decode(str(path))


def deflated_dicom(path, rows: int, columns: int, pixel_bytes: int):
    """A Deflated Explicit VR Little Endian DICOM declaring rows x columns 16-bit pixels around
    `pixel_bytes` of zeros (which deflate to a thousandth of that)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    return write_dicom(path, rows, columns, bytes(pixel_bytes), DeflatedExplicitVRLittleEndian)


@pytest.mark.timeout(120)
def test_a_deflated_dicom_bomb_is_refused_while_inflating(tmp_path):
    bomb = deflated_dicom(tmp_path / "bomb.dcm", 64, 64, 96 << 20)  # 96 MiB of pixel data for a 64x64 image
    assert bomb.stat().st_size < 1 << 20
    refused = decode_in_child(bomb, MEDSAPIENS_MAX_PIXELS="1000000")  # at most 4 + 16 MiB inflated
    assert refused["shape"] is None and refused["peak_mib"] < 400
    assert refused["error"].startswith(f"absurd_image_size: {bomb}: its deflated data inflate past 19 MiB")
    fine = deflated_dicom(tmp_path / "fine.dcm", 64, 48, 64 * 48 * 2)
    assert decode_in_child(fine, MEDSAPIENS_MAX_PIXELS="1000000")["shape"] == [64, 48]


def j2k_dicom(path, pixels: np.ndarray, declared: tuple[int, int] | None = None):
    """A JPEG 2000 DICOM of `pixels`; `declared` (width, height) rewrites the size its codestream names."""
    import struct

    from openjpeg import encode
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    codestream = bytearray(encode(pixels, codec_format=0))
    if declared is not None:  # SIZ after SOC: marker, Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz
        struct.pack_into(">IIIIII", codestream, 8, *declared, 0, 0, *declared)
    return write_dicom(path, *pixels.shape, encapsulate([bytes(codestream)]), JPEG2000Lossless)


@pytest.mark.timeout(120)
def test_a_compressed_frame_declaring_another_size_than_its_header_is_refused_before_decoding(tmp_path):
    pixels = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 7) % 4096
    fine = decode_in_child(j2k_dicom(tmp_path / "fine.dcm", pixels))
    assert fine["shape"] == [64, 48], fine
    bomb = j2k_dicom(tmp_path / "bomb.dcm", pixels, declared=(12000, 12000))  # 144 megapixels behind a 64x48 header
    refused = decode_in_child(bomb)
    assert refused["shape"] is None and refused["peak_mib"] < 400, refused
    assert refused["error"] == f"unreadable_image: {bomb}: its compressed frame is 12000x12000 px where its header says 48x64"


def jpeg_dicom(path, pixels: np.ndarray, declared: tuple[int, int] | None = None, comment_bytes: int = 0):
    """A baseline JPEG DICOM of 8-bit `pixels`; `comment_bytes` of COM segments before the frame header
    (as large EXIF or ICC segments put it far from the start); `declared` (width, height) rewrites the
    size the frame header names."""
    import io
    import struct

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    comments = b"".join(b"\xff\xfe" + struct.pack(">H", 65535) + b"c" * 65533 for _ in range(comment_bytes // 65533))
    data[2:2] = comments
    if declared is not None:
        pos = 2
        while data[pos + 1] != 0xC0:  # to the baseline frame header (SOF0)
            pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        struct.pack_into(">HH", data, pos + 5, declared[1], declared[0])
    return write_dicom(path, *pixels.shape, encapsulate([bytes(data)]), JPEGBaseline8Bit, bits_stored=8,
                       BitsAllocated=8, HighBit=7)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("comment_bytes", [0, 3 * 65533], ids=["plain", "frame header past 192 KiB of comments"])
def test_a_jpeg_frame_declaring_another_size_is_refused_wherever_its_header_lies(tmp_path, comment_bytes):
    pixels = (np.arange(64 * 48).reshape(64, 48) % 200).astype(np.uint8)
    fine = decode_in_child(jpeg_dicom(tmp_path / "fine.dcm", pixels, comment_bytes=comment_bytes))
    assert fine["shape"] == [64, 48], fine
    bomb = jpeg_dicom(tmp_path / "bomb.dcm", pixels, declared=(12000, 12000), comment_bytes=comment_bytes)
    refused = decode_in_child(bomb)
    assert refused["shape"] is None and refused["peak_mib"] < 400, refused
    assert refused["error"] == f"unreadable_image: {bomb}: its compressed frame is 12000x12000 px where its header says 48x64"
