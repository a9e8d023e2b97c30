"""Target-weighted heatmap MSE per head (mmpose KeypointMSELoss with use_target_weight), and the
training objective of a mixed multi-dataset batch.

Two ways to average a mixed batch (`train.loss`):
- `per_sample` (ours): a sample's loss is the mean over its own K x h x w elements; the batch
  loss is the mean over samples, so every image weighs the same whatever its K.
- `union` (MedSapiens): one output over the union of all heads' landmarks (88 channels for head,
  chest, hand, leg), other datasets' channels masked with weight 0, averaged over B x 88 x h x w:
  a sample weighs by its K (a 37-landmark hand image 6x a 6-landmark chest image).
With one head (fine-tuning) the two are equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from medsapiens.data.augment import normalize
from medsapiens.model.decoder import HeadOutput


@dataclass
class HeatmapLoss:
    total: torch.Tensor  # scalar with grad: the mean over the batch of per-sample losses
    per_dataset: dict[str, torch.Tensor]  # detached mean over that dataset's samples (0 when absent)
    counts: dict[str, int]  # samples per dataset in this batch


def heatmap_loss(
    outputs: dict[str, HeadOutput], target_heatmaps: torch.Tensor, target_weights: torch.Tensor,
    average: str = "per_sample",
) -> HeatmapLoss:
    """outputs from `MultiHeadDecoder.forward`; targets padded to the batch's largest K:
    target_heatmaps (B, Kmax, h, w), target_weights (B, Kmax), weight 0 beyond a dataset's K.

    A sample's loss is the mean over its K x h x w elements of (w * (pred - target))^2; `average`
    (see the module docstring) weighs it by 1 or by K / (sum of every head's K). Every head adds
    its (possibly empty) sum to the total, so empty heads stay in the graph with zero grads.
    per_dataset is the unweighted mean sample loss of each dataset either way."""
    batch = target_heatmaps.shape[0]
    weights = sample_weights(average, {dataset_id: head.heatmaps.shape[1] for dataset_id, head in outputs.items()})
    total = target_heatmaps.new_zeros((), dtype=torch.float32)
    per_dataset, counts = {}, {}
    for dataset_id, (indices, heatmaps) in outputs.items():
        counts[dataset_id] = indices.numel()
        if counts[dataset_id]:
            group_sum = _sample_losses(dataset_id, heatmaps, target_heatmaps, target_weights, indices).sum()
        else:  # the targets may be narrower than this head's K; the empty sum is 0, in the graph
            group_sum = heatmaps.sum()
        total = total + group_sum * weights[dataset_id]
        per_dataset[dataset_id] = group_sum.detach() / max(counts[dataset_id], 1)
    return HeatmapLoss(total / batch, per_dataset, counts)


def sample_weights(average: str, landmarks: dict[str, int]) -> dict[str, float]:
    """What a sample of each head ({dataset: K}) weighs in the loss: 1, or K / (sum of every head's K)."""
    if average not in ("per_sample", "union"):
        raise ValueError(f"loss average must be 'per_sample' or 'union', got {average!r}")
    union = sum(landmarks.values())
    return {dataset_id: k / union if average == "union" else 1.0 for dataset_id, k in landmarks.items()}


@dataclass(frozen=True)
class LandmarkObjective:
    """The loss of one landmark micro-batch, as the engine's train_step asks for it; `landmarks`, the
    model's heads as (dataset, K) pairs, weigh the logged loss as the batches' losses were weighed."""

    average: str = "per_sample"
    landmarks: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.average == "union" and not self.landmarks:
            raise ValueError("the union loss needs the model's heads (landmarks)")

    def mean_loss(self, totals: dict[str, tuple[float, int]]) -> float:
        """The loss the steps optimised, averaged over the samples of `totals` ({dataset: (summed
        unweighted loss, samples)}, as __call__ reports them)."""
        weights = sample_weights(self.average, dict(self.landmarks))
        weighted = sum(weights[name] * loss_sum for name, (loss_sum, _) in totals.items())
        return weighted / max(1, sum(n for _, n in totals.values()))

    def __call__(self, forward, batch: dict, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
        """-> (loss with grad, {dataset: (summed loss tensor, samples)} for exact averaging at
        logging time; tensors, so there is no host sync per step)."""
        outputs = forward(normalize(batch["images"]).to(dtype), batch["dataset_index"])
        loss = heatmap_loss(outputs, batch["target_heatmaps"], batch["target_weights"], self.average)
        return loss.total, {name: (loss.per_dataset[name] * n, n) for name, n in loss.counts.items() if n}


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
