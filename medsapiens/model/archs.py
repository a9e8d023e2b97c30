"""Sapiens and Sapiens2 ViT sizes. Torch-free, so the CLI and cost estimates can read them cheaply."""
from __future__ import annotations

from dataclasses import dataclass

from medsapiens.data.preprocess import MAX_INPUT_SIDE
from medsapiens.errors import InputError
from medsapiens.io.record import is_whole

PATCH_SIZE = 16
DEFAULT_IMG_SIZE = (1024, 768)  # (H, W), the Sapiens pose input
DEFAULT_TRUNK_WIDTH = 768  # channels of the Sapiens heatmap-head trunk
SAPIENS2_PREFIX_TOKENS = 9  # one cls and eight storage tokens before the patches
SAPIENS2_FULL_ATTENTION_BLOCKS = 8  # at each end of the stack; the blocks between use heads/2 key-value heads


@dataclass(frozen=True)
class ArchSpec:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int  # the FFN's hidden width (Sapiens2: of each SwiGLU branch)
    family: str = "sapiens"  # "sapiens" (timm ViT, learned positions) or "sapiens2" (RoPE, GQA, SwiGLU)


ARCHS: dict[str, ArchSpec] = {
    a.name: a
    for a in (
        ArchSpec("sapiens_tiny", 192, 4, 3, 768),  # tests and the CPU demo
        ArchSpec("sapiens_small", 384, 6, 6, 1536),
        ArchSpec("sapiens_0.3b", 1024, 24, 16, 4096),
        ArchSpec("sapiens_0.6b", 1280, 32, 16, 5120),
        ArchSpec("sapiens_1b", 1536, 40, 24, 6144),
        ArchSpec("sapiens_2b", 1920, 48, 32, 7680),
        # Sapiens2: the released sizes; the tiny one (tests, CPU demo) is deep enough for grouped-query
        # blocks (8 and 9) between the full-attention ends
        ArchSpec("sapiens2_tiny", 128, 18, 4, 512, "sapiens2"),
        ArchSpec("sapiens2_0.1b", 768, 12, 12, 3072, "sapiens2"),
        ArchSpec("sapiens2_0.4b", 1024, 24, 16, 4096, "sapiens2"),
        ArchSpec("sapiens2_0.8b", 1280, 32, 16, 5120, "sapiens2"),
        ArchSpec("sapiens2_1b", 1536, 40, 24, 6144, "sapiens2"),
        ArchSpec("sapiens2_5b", 2432, 56, 32, 9728, "sapiens2"),
    )
}


def kv_heads(arch: ArchSpec, block: int) -> int:
    """Key-value heads of a block: one per head, except Sapiens2's middle blocks (grouped-query attention)."""
    ends = SAPIENS2_FULL_ATTENTION_BLOCKS
    if arch.family != "sapiens2" or block < ends or block >= arch.depth - ends:
        return arch.num_heads
    return arch.num_heads // 2


def prefix_tokens(arch: ArchSpec) -> int:
    """Tokens the blocks carry besides the patches."""
    return SAPIENS2_PREFIX_TOKENS if arch.family == "sapiens2" else 0


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
    if not (is_whole(h) and is_whole(w)) or h % PATCH_SIZE or w % PATCH_SIZE or h <= 0 or w <= 0:
        raise InputError(f"image size {h}x{w} must be positive multiples of {PATCH_SIZE}")
    if max(h, w) > MAX_INPUT_SIDE:
        raise InputError(f"image size {h}x{w}: a side over {MAX_INPUT_SIDE} px is not a model input "
                         f"({(h // PATCH_SIZE) * (w // PATCH_SIZE):,} tokens)")
    return h // PATCH_SIZE, w // PATCH_SIZE
