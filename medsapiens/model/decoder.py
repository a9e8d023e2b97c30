"""The shared multi-head landmark decoder: the Sapiens heatmap-head trunk shared by all datasets,
then one 1x1 conv head per dataset.

Routing: a mixed batch carries `dataset_index` (B,), positions in `dataset_ids`. The trunk runs on
the whole batch; each head runs on its samples (gathered with index_select). Every head runs on
every step, on an empty (0, C, h, w) batch when none of its samples is present, so that every
parameter gets a (zero) gradient and DeepSpeed's ZeRO gradient reductions stay in lockstep
across ranks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from medsapiens.model.archs import DEFAULT_TRUNK_WIDTH

INIT_STD = 0.001  # Sapiens: Normal(std 0.001) for Conv2d and ConvTranspose2d, bias 0


class HeadOutput(NamedTuple):
    indices: torch.Tensor  # (n,) int64: positions of this dataset's samples in the batch
    heatmaps: torch.Tensor  # (n, K, H/4, W/4)


class ConvNormAct(nn.Sequential):
    """conv -> InstanceNorm2d (no affine) -> SiLU."""

    def __init__(self, conv: nn.Module, channels: int):
        super().__init__()
        self.conv = conv
        self.norm = nn.InstanceNorm2d(channels)
        self.act = nn.SiLU()


def build_trunk(in_channels: int, width: int) -> nn.Sequential:
    """2 x [deconv k4 s2 p1 (no bias)], 2 x [1x1 conv]: (B, C, h, w) -> (B, width, 4h, 4w)."""
    return nn.Sequential(
        ConvNormAct(nn.ConvTranspose2d(in_channels, width, 4, stride=2, padding=1, bias=False), width),
        ConvNormAct(nn.ConvTranspose2d(width, width, 4, stride=2, padding=1, bias=False), width),
        ConvNormAct(nn.Conv2d(width, width, 1), width),
        ConvNormAct(nn.Conv2d(width, width, 1), width),
    )


def init_conv(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MultiHeadDecoder(nn.Module):
    """Shared trunk + `heads[dataset_id]` (1x1 conv, K channels). State-dict keys:
    `trunk.{0..3}.conv.*`, `heads.<dataset_id>.{weight,bias}`."""

    def __init__(self, in_channels: int, heads: dict[str, int], width: int = DEFAULT_TRUNK_WIDTH):
        super().__init__()
        self.width = width
        self.trunk = build_trunk(in_channels, width)
        self.trunk.apply(init_conv)
        self.heads = nn.ModuleDict()
        for dataset_id, num_landmarks in heads.items():
            self.add_head(dataset_id, num_landmarks)

    @property
    def dataset_ids(self) -> list[str]:
        """The order that `dataset_index` refers to. Adding appends; dropping shifts later ids."""
        return list(self.heads.keys())

    @property
    def num_landmarks(self) -> dict[str, int]:
        return {dataset_id: head.out_channels for dataset_id, head in self.heads.items()}

    def add_head(self, dataset_id: str, num_landmarks: int) -> None:
        """A freshly initialised head, on the device and dtype of the trunk."""
        if dataset_id in self.heads:
            raise ValueError(f"decoder already has a head for {dataset_id!r}")
        reference = self.trunk[-1].conv.weight
        head = nn.Conv2d(self.width, num_landmarks, 1, device=reference.device, dtype=reference.dtype)
        init_conv(head)
        self.heads[dataset_id] = head

    def drop_head(self, dataset_id: str) -> None:
        if dataset_id not in self.heads:
            raise KeyError(f"decoder has no head {dataset_id!r}; heads: {', '.join(self.heads)}")
        del self.heads[dataset_id]

    def forward(self, features: torch.Tensor, dataset_index: torch.Tensor) -> dict[str, HeadOutput]:
        """features (B, C, h, w), dataset_index (B,) -> {dataset_id: HeadOutput} for EVERY head,
        in `dataset_ids` order; a head without samples in the batch gives n = 0."""
        shared = self.trunk(features)
        outputs = {}
        for position, (dataset_id, head) in enumerate(self.heads.items()):
            indices = torch.nonzero(dataset_index == position).flatten()
            outputs[dataset_id] = HeadOutput(indices, head(shared.index_select(0, indices)))
        routed = sum(out.indices.numel() for out in outputs.values())
        if routed != features.shape[0]:
            raise ValueError(
                f"dataset_index routes {routed} of {features.shape[0]} samples: values must lie in "
                f"0..{len(self.heads) - 1} (heads {self.dataset_ids})"
            )
        return outputs
