"""Image files in and out: decoding (PNG, JPG, BMP, DICOM), resizing, PNG encoding.

Shared by the shard writer, the input pipeline and prediction on new images.

Pixels travel as numpy arrays: (H, W) uint8 or uint16 grey, or (H, W, 3) uint8 RGB. Grey stays
grey, 16-bit stays 16-bit (resized through float32 so no precision is lost to 8 bits). Every
failure is a `Rejection` naming the file.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from medsapiens.record import Rejection, check_image_size

PNG_COMPRESS_LEVEL = 3  # lossless either way; 3 is several times faster than 9 for a few % more bytes
RESAMPLE = Image.Resampling.LANCZOS  # PIL widens the kernel when downscaling: antialiased


def decode(path: str) -> np.ndarray:
    if not Path(path).is_file():
        raise Rejection("missing_image", f"no image file {path}")
    if path.lower().endswith(".dcm"):
        return decode_dicom(path)
    try:
        image = Image.open(path)
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a file it cannot identify
        raise Rejection("unreadable_image", f"{path}: {exc}") from None
    with image:
        check_image_size(*image.size)
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise Rejection("absurd_image_size", f"{path}: {exc}") from None
        except Exception as exc:  # noqa: BLE001
            reason = "truncated_image" if "truncated" in str(exc) or isinstance(exc, EOFError) else "unreadable_image"
            raise Rejection(reason, f"{path}: {exc}") from None
        return pil_to_array(image, path)


def pil_to_array(image: Image.Image, where: str) -> np.ndarray:
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if image.mode in ("I", "F"):
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise Rejection("unreadable_image", f"{where}: {image.mode} pixels outside 0..65535 are not supported")
        return np.rint(values).astype(np.uint16)
    if image.mode == "L":
        return np.asarray(image)
    if image.mode in ("1", "LA", "La"):
        return np.asarray(image.convert("L"))
    rgb = np.asarray(image.convert("RGB"))
    return rgb[..., 0].copy() if is_grey(rgb) else rgb


def is_grey(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def decode_dicom(path: str) -> np.ndarray:
    """Stored values -> modality values (RescaleSlope/Intercept); MONOCHROME1 inverted so bone is
    bright; kept at the file's depth (8 or 16 bit), mapped onto its range only when they do not fit."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
        check_image_size(int(ds.Columns), int(ds.Rows))
        stored = ds.pixel_array
    except Rejection:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom and its pixel handlers raise many kinds
        reason = "truncated_image" if "length" in str(exc).lower() or "truncat" in str(exc).lower() else "unreadable_image"
        raise Rejection(reason, f"{path}: {exc}") from None
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return np.asarray(stored, dtype=np.uint8)
    if stored.ndim != 2:
        raise Rejection("unreadable_image", f"{path}: multi-frame DICOM ({stored.shape}) is not supported")
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        values = values.max() + values.min() - values
    return to_depth(values, 8 if int(ds.BitsAllocated) <= 8 else 16)


DICOM_SPACING_TAGS = (("PixelSpacing", "DICOM PixelSpacing (0028,0030)"),
                      ("ImagerPixelSpacing", "DICOM ImagerPixelSpacing (0018,1164)"))


def dicom_spacing(path) -> tuple[tuple[float, float] | None, str]:
    """((sx, sy) mm/px or None, the tag it came from): PixelSpacing, else ImagerPixelSpacing (detector
    plane, not corrected for magnification). Both are stored [row, col], hence reversed."""
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True)
    for tag, label in DICOM_SPACING_TAGS:
        value = header.get(tag)
        if value is not None and len(value) == 2:
            return (float(value[1]), float(value[0])), label
    return None, "none"


def to_depth(values: np.ndarray, bits: int) -> np.ndarray:
    dtype = np.uint8 if bits == 8 else np.uint16
    top = np.iinfo(dtype).max
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0 and hi <= top and np.array_equal(values, np.rint(values)):
        return values.astype(dtype)
    return np.rint((values - lo) / ((hi - lo) or 1.0) * top).astype(dtype)


def size_of(pixels: np.ndarray) -> tuple[int, int]:
    return pixels.shape[1], pixels.shape[0]


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if size == size_of(pixels):
        return pixels
    if pixels.dtype == np.uint16:
        resized = np.asarray(Image.fromarray(pixels.astype(np.float32), "F").resize(size, RESAMPLE))
        return np.clip(np.rint(resized), 0, 65535).astype(np.uint16)
    return np.asarray(Image.fromarray(pixels).resize(size, RESAMPLE))


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_png(data: bytes, max_side: int | None = None) -> np.ndarray:
    """A shard's PNG; one with a side over `max_side` is refused from its header, before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if max_side is not None and max(image.size) > max_side:
                raise ValueError(f"a {image.size[0]}x{image.size[1]} px image, over the shards' max side {max_side}")
            image.load()
            return pil_to_array(image, "PNG bytes")
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image refused: {exc}") from None


def to_float(pixels: np.ndarray) -> np.ndarray:
    """float32 on a 0-255 scale whatever the depth (16-bit divided by 257), for the network input."""
    scale = 257.0 if pixels.dtype == np.uint16 else 1.0
    return pixels.astype(np.float32) / scale

