"""Backbone + shared multi-head decoder.

State-dict keys (what bundles store): `backbone.<timm ViT keys>`, `decoder.trunk.{0..3}.conv.*`,
`decoder.heads.<dataset_id>.{weight,bias}`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medsapiens.errors import InputError
from medsapiens.io.record import is_whole
from medsapiens.model.archs import DEFAULT_IMG_SIZE, DEFAULT_TRUNK_WIDTH, ArchSpec, feature_grid, get_arch
from medsapiens.model.backbone import Backbone
from medsapiens.model.decoder import HeadOutput, MultiHeadDecoder
from medsapiens.model.lora import base_backbone
from medsapiens.model.loss import HeatmapLoss, LandmarkObjective, heatmap_loss
from medsapiens.model.weights import load_backbone

RECOMPILES_PER_REGION_KIND = 8  # dynamo's default recompile_limit: train / eval x dynamic batch / batch 1


class LandmarkModel(nn.Module):
    def __init__(self, backbone: Backbone, decoder: MultiHeadDecoder):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward(self, images: torch.Tensor, dataset_index: torch.Tensor) -> dict[str, HeadOutput]:
        """images (B, 3, H, W), dataset_index (B,) into `dataset_ids` ->
        {dataset_id: HeadOutput(indices (n,), heatmaps (n, K, H/4, W/4))} for every head."""
        return self.decoder(self.backbone(images), dataset_index)

    def heatmaps(self, images: torch.Tensor, dataset_id: str) -> torch.Tensor:
        """All images through one dataset's head: (B, K, H/4, W/4), for evaluation and prediction."""
        position = self.dataset_ids.index(dataset_id)
        index = torch.full((images.shape[0],), position, dtype=torch.long, device=images.device)
        return self(images, index)[dataset_id].heatmaps

    @staticmethod
    def loss(outputs: dict[str, HeadOutput], target_heatmaps: torch.Tensor,
             target_weights: torch.Tensor, average: str = "per_sample") -> HeatmapLoss:
        return heatmap_loss(outputs, target_heatmaps, target_weights, average)

    def objective(self, average: str = "per_sample") -> LandmarkObjective:
        """The training loss of a micro-batch (see medsapiens.model.loss for `average`)."""
        return LandmarkObjective(average, tuple(self.decoder.num_landmarks.items()))

    @property
    def dataset_ids(self) -> list[str]:
        return self.decoder.dataset_ids

    def compile_regions(self) -> int:
        """torch.compile, in place, each transformer block and the decoder trunk (regional compilation,
        as torchtitan does): identical blocks share one compiled graph, so start-up compiles one block,
        and the per-dataset routing, whose shapes depend on the batch, stays eager. Parameter names,
        so checkpoints, are unchanged. Returns how many regions were compiled.

        Dynamo's recompile limit counts the variants of one code object: all blocks share
        `Block.forward`, yet Sapiens2's two kinds of block (full and grouped-query attention) each need
        their own graph per mode and batch shape. Past the limit a region silently runs eager, so the
        limit grows to dynamo's default budget for each distinct kind of region."""
        regions = [*base_backbone(self).blocks, self.decoder.trunk]
        kinds = len({repr(region) for region in regions})
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILES_PER_REGION_KIND * kinds)
        for region in regions:
            region.compile()
        return len(regions)

    def add_head(self, dataset_id: str, num_landmarks: int) -> None:
        self.decoder.add_head(dataset_id, num_landmarks)

    def drop_head(self, dataset_id: str) -> None:
        self.decoder.drop_head(dataset_id)


def build_model(
    arch: str | ArchSpec,
    img_size: tuple[int, int] = DEFAULT_IMG_SIZE,
    heads: dict[str, int] | None = None,
    trunk_width: int = DEFAULT_TRUNK_WIDTH,
    checkpoint: str | None = None,
    grad_checkpointing: bool = False,
) -> LandmarkModel:
    """heads: {dataset_id: K} in the order `dataset_index` refers to."""
    backbone = load_backbone(arch, checkpoint, img_size, grad_checkpointing)
    return LandmarkModel(backbone, MultiHeadDecoder(backbone.embed_dim, heads or {}, trunk_width))


@dataclass
class ModelConfig:
    """The model section of an experiment config (img_size is (H, W), a multiple of 16)."""

    arch: str = "sapiens_0.3b"
    img_size: tuple[int, int] = DEFAULT_IMG_SIZE
    trunk_width: int = DEFAULT_TRUNK_WIDTH
    checkpoint: str | None = None
    grad_checkpointing: bool = False

    @property
    def input_size(self) -> tuple[int, int]:
        """(W, H): the order the codec and the pipeline use."""
        return self.img_size[1], self.img_size[0]

    def check(self) -> None:
        try:
            get_arch(self.arch)
            feature_grid(self.img_size)
        except ValueError as exc:
            raise InputError(f"model: {exc} (model.arch, model.img_size)") from None
        if not is_whole(self.trunk_width) or self.trunk_width < 1:
            raise InputError(f"model.trunk_width must be a whole number of at least 1, got {self.trunk_width!r}")
        if not isinstance(self.grad_checkpointing, bool):
            raise InputError(f"model.grad_checkpointing must be true or false, got {self.grad_checkpointing!r}")

    def build(self, heads: dict[str, int]) -> LandmarkModel:
        return build_model(self.arch, self.img_size, heads, self.trunk_width, self.checkpoint, self.grad_checkpointing)
