"""The Sapiens ViT as a configured timm `VisionTransformer` (state-dict keys timm's), and the builder
of either family's backbone (Sapiens2: medsapiens.model.sapiens2)."""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medsapiens.model.archs import DEFAULT_IMG_SIZE, PATCH_SIZE, ArchSpec, feature_grid, get_arch
from medsapiens.model.sapiens2 import Sapiens2ViT

SAPIENS_PATCH_PADDING = 2


class PaddedPatchEmbed(PatchEmbed):
    """timm's PatchEmbed with the Sapiens conv padding of 2 px. For sizes divisible by 16 the grid
    is unchanged (H/16 x W/16) but shifted by -2 px; the weights keep the key `proj.*`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.proj.padding = (SAPIENS_PATCH_PADDING, SAPIENS_PATCH_PADDING)


class SapiensViT(VisionTransformer):
    """Pre-LN ViT without cls token: (B, 3, H, W) -> patch features (B, C, H/16, W/16).

    The input size is fixed at construction (the learned pos_embed has one slot per patch)."""

    def __init__(self, arch: ArchSpec, img_size: tuple[int, int] = DEFAULT_IMG_SIZE):
        feature_grid(img_size)  # validates the size
        super().__init__(
            img_size=tuple(img_size),
            patch_size=PATCH_SIZE,
            num_classes=0,
            global_pool="",
            embed_dim=arch.embed_dim,
            depth=arch.depth,
            num_heads=arch.num_heads,
            mlp_ratio=arch.mlp_dim / arch.embed_dim,
            qkv_bias=True,
            class_token=False,
            final_norm=True,
            embed_layer=PaddedPatchEmbed,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            act_layer=nn.GELU,
            drop_path_rate=0.0,
        )
        self.arch = arch
        self.depth = arch.depth

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(images)
        h, w = self.grid_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.embed_dim, h, w)


Backbone = SapiensViT | Sapiens2ViT


def build_backbone(arch: str | ArchSpec, img_size: tuple[int, int] = DEFAULT_IMG_SIZE) -> Backbone:
    """A randomly initialised backbone of the arch's family. Build it under `torch.device("meta")`
    to get shapes without memory."""
    spec = get_arch(arch)
    return Sapiens2ViT(spec, img_size) if spec.family == "sapiens2" else SapiensViT(spec, img_size)

