"""Sapiens ViT sizes. Torch-free, so the CLI and cost estimates can read them cheaply."""
from __future__ import annotations

from dataclasses import dataclass

from medsapiens.errors import InputError

PATCH_SIZE = 16
DEFAULT_IMG_SIZE = (1024, 768)  # (H, W), the Sapiens pose input
DEFAULT_TRUNK_WIDTH = 768  # channels of the Sapiens heatmap-head trunk


@dataclass(frozen=True)
class ArchSpec:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int


ARCHS: dict[str, ArchSpec] = {
    a.name: a
    for a in (
        ArchSpec("sapiens_tiny", 192, 4, 3, 768),  # tests and the CPU demo
        ArchSpec("sapiens_small", 384, 6, 6, 1536),
        ArchSpec("sapiens_0.3b", 1024, 24, 16, 4096),
        ArchSpec("sapiens_0.6b", 1280, 32, 16, 5120),
        ArchSpec("sapiens_1b", 1536, 40, 24, 6144),
        ArchSpec("sapiens_2b", 1920, 48, 32, 7680),
    )
}


def get_arch(arch: str | ArchSpec) -> ArchSpec:
    if isinstance(arch, ArchSpec):
        return arch
    try:
        return ARCHS[arch]
    except KeyError:
        raise InputError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}") from None


def feature_grid(img_size: tuple[int, int]) -> tuple[int, int]:
    """(H/16, W/16): the backbone's token grid for an (H, W) input."""
    h, w = img_size
    if h % PATCH_SIZE or w % PATCH_SIZE or h <= 0 or w <= 0:
        raise InputError(f"image size {h}x{w} must be positive multiples of {PATCH_SIZE}")
    return h // PATCH_SIZE, w // PATCH_SIZE
