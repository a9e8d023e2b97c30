"""Target-weighted heatmap MSE per head (mmpose KeypointMSELoss with use_target_weight)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from medsapiens.model.decoder import HeadOutput


@dataclass
class HeatmapLoss:
    total: torch.Tensor  # scalar with grad: the mean over the batch of per-sample losses
    per_dataset: dict[str, torch.Tensor]  # detached mean over that dataset's samples (0 when absent)
    counts: dict[str, int]  # samples per dataset in this batch


def heatmap_loss(
    outputs: dict[str, HeadOutput], target_heatmaps: torch.Tensor, target_weights: torch.Tensor
) -> HeatmapLoss:
    """outputs from `MultiHeadDecoder.forward`; targets padded to the batch's largest K:
    target_heatmaps (B, Kmax, h, w), target_weights (B, Kmax), weight 0 beyond a dataset's K.

    A sample's loss is the mean over its K x h x w elements of (w * (pred - target))^2. Every head
    adds its (possibly empty) sum to the total, so empty heads stay in the graph with zero grads."""
    batch = target_heatmaps.shape[0]
    total = target_heatmaps.new_zeros((), dtype=torch.float32)
    per_dataset, counts = {}, {}
    for dataset_id, (indices, heatmaps) in outputs.items():
        counts[dataset_id] = indices.numel()
        if counts[dataset_id]:
            group_sum = _sample_losses(dataset_id, heatmaps, target_heatmaps, target_weights, indices).sum()
        else:  # the targets may be narrower than this head's K; the empty sum is 0, in the graph
            group_sum = heatmaps.sum()
        total = total + group_sum
        per_dataset[dataset_id] = group_sum.detach() / max(counts[dataset_id], 1)
    return HeatmapLoss(total / batch, per_dataset, counts)


def _sample_losses(dataset_id, heatmaps, target_heatmaps, target_weights, indices) -> torch.Tensor:
    num_landmarks = heatmaps.shape[1]
    if num_landmarks > target_heatmaps.shape[1] or heatmaps.shape[2:] != target_heatmaps.shape[2:]:
        raise ValueError(
            f"head {dataset_id!r} predicts {tuple(heatmaps.shape[1:])} per sample but the targets are "
            f"{tuple(target_heatmaps.shape[1:])}"
        )
    target = target_heatmaps.index_select(0, indices)[:, :num_landmarks].float()
    weight = target_weights.index_select(0, indices)[:, :num_landmarks, None, None].float()
    return ((heatmaps.float() - target) * weight).pow(2).mean(dim=(1, 2, 3))
