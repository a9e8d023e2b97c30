"""From model heatmaps to landmarks in original-image pixels, and the evaluation loop over a split.

Used by validation during training, by `medsapiens evaluate` and by `medsapiens predict`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from medsapiens import distributed
from medsapiens.data.codec import apply_affine, decode_udp, flip_heatmaps, heatmap_to_input
from medsapiens.data.pipeline import EvalExample, eval_example, eval_examples, heatmap_size
from medsapiens.errors import InputError
from medsapiens.evaluation.metrics import Protocol, radial_errors
from medsapiens.io.manifest import Manifest
from medsapiens.io.record import original_spacing, to_original
from medsapiens.model import bundle as bundlelib


@torch.no_grad()
def predict_heatmaps(model, images: torch.Tensor, dataset_id: str, dataset_index: int,
                     flip_permutation=None) -> torch.Tensor:
    """(B, K, h, w) float32 heatmaps of one dataset's head; averaged with the flipped view if asked."""
    index = torch.full((len(images),), dataset_index, dtype=torch.long, device=images.device)
    heat = model(images, index)[dataset_id].heatmaps.float()
    if flip_permutation is not None:
        flipped = model(images.flip(-1), index)[dataset_id].heatmaps.float()
        heat = (heat + flip_heatmaps(flipped, flip_permutation)) / 2
    return heat


def heatmaps_to_image(heatmaps: torch.Tensor, matrices: torch.Tensor, input_size, blur_kernel: int = 11):
    """Decode and map back through each sample's affine: (B, K, 2) image pixels and (B, K) scores."""
    keypoints, scores = decode_udp(heatmaps.cpu(), blur_kernel)
    in_pixels = heatmap_to_input(keypoints, input_size, heatmap_size(input_size))
    return apply_affine(torch.linalg.inv(matrices.double()), in_pixels).numpy(), scores.numpy()


@dataclass
class SplitPredictions:
    """Everything needed to score one split, in original pixels, gathered from all ranks."""

    ids: list = field(default_factory=list)
    pred: list = field(default_factory=list)
    gt: list = field(default_factory=list)
    visible: list = field(default_factory=list)
    spacing: list = field(default_factory=list)
    orig_size: list = field(default_factory=list)
    panels: list = field(default_factory=list)

    def extend(self, other: "SplitPredictions") -> None:
        for name in vars(self):
            getattr(self, name).extend(getattr(other, name))

    def errors(self, protocol: Protocol):
        """(errors (N, K) in the protocol's unit, mask (N, K) of those that count): invisible landmarks and
        the images the protocol cannot scale (`unscalable`) do not. Predictions that are not finite (the
        heatmaps of a diverged model) are refused, naming the images, rather than scored."""
        refuse_non_finite(self.pred, self.ids)
        mask = np.stack(self.visible) > 0
        unscaled = self.unscalable(protocol)
        mask[[i in unscaled for i in self.ids]] = False
        return radial_errors(np.stack(self.pred), np.stack(self.gt), self.unit_per_pixel(protocol)), mask

    def unit_per_pixel(self, protocol: Protocol) -> np.ndarray:
        """(N, 2): each image's (sx, sy), ones for an image the protocol cannot scale."""
        unscaled = self.unscalable(protocol)
        return np.stack([np.ones(2) if i in unscaled else protocol.unit_per_pixel(g, s, o, i)
                         for g, s, o, i in zip(self.gt, self.spacing, self.orig_size, self.ids, strict=True)])

    def unscalable(self, protocol: Protocol) -> dict[str, str]:
        return protocol.unscalable_images(np.stack(self.visible) > 0, self.ids)


def refuse_non_finite(pred: list, ids: list[str]) -> None:
    bad = [image_id for image_id, points in zip(ids, pred, strict=True) if not np.isfinite(points).all()]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InputError(f"the model's heatmaps hold NaN or infinity on {len(bad)} image(s) ({', '.join(bad[:5])}{more}): "
                         "no landmark to score (a diverged model?)")


@dataclass(frozen=True)
class PredictSettings:
    """How a split goes through a model: its input size and codec, the batch, precision, device, flip test."""

    input_size: tuple[int, int]
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    batch_size: int = 8
    flip_test: bool = False
    margin: float = 1.25
    blur_kernel: int = 11

    @classmethod
    def of_bundle(cls, model, bundle: bundlelib.Bundle, device, batch_size: int, flip_test: bool) -> PredictSettings:
        """A bundle's own input size and codec, the model's precision."""
        return cls(bundle.input_size, device, next(model.parameters()).dtype, batch_size, flip_test,
                   bundle.codec.margin, bundle.codec.blur_kernel)


def predict_split(model, manifest: Manifest, dataset_id: str, dataset_index: int, split: str,
                  settings: PredictSettings, limit: int = 0, panels: int = 0) -> SplitPredictions | None:
    """Run a split (its first `limit` images when > 0) through the model on every rank; rank 0 returns
    the gathered predictions with up to `panels` images kept for drawing."""
    landmark_set = manifest.landmark_set(dataset_id)
    perm = landmark_set.flip_permutation() if settings.flip_test and landmark_set.can_flip else None
    mine = SplitPredictions()
    examples = eval_examples(manifest, dataset_id, split, settings.input_size, settings.margin,
                             distributed.rank(), distributed.world_size(), limit)
    batch = []

    def run(batch):
        images = torch.stack([e.image for e in batch]).to(settings.device, settings.dtype)
        heat = predict_heatmaps(model, images, dataset_id, dataset_index, perm)
        stored, _ = heatmaps_to_image(heat, torch.stack([e.matrix for e in batch]), settings.input_size,
                                      settings.blur_kernel)
        for e, points in zip(batch, stored, strict=True):
            if not e.valid:
                continue
            meta = e.meta
            mine.ids.append(meta["source_id"])
            mine.pred.append(to_original(points, meta["scale"]))
            mine.gt.append(to_original(meta["landmarks"], meta["scale"]))
            mine.visible.append(np.asarray(meta["visible"]))
            mine.spacing.append(original_spacing(meta))
            mine.orig_size.append(meta["orig_size"])
            if len(mine.panels) < panels:
                mine.panels.append((meta["source_id"], e.image, points_in_input(e.matrix, points),
                                    points_in_input(e.matrix, meta["landmarks"])))

    for example in examples:
        batch.append(example)
        if len(batch) == settings.batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    gathered = distributed.gather_to_rank0(mine)
    if gathered is None:
        return None
    result = SplitPredictions()
    for part in gathered:
        result.extend(part)
    result.panels = result.panels[:panels]
    return result


def points_in_input(matrix: torch.Tensor, stored_points) -> np.ndarray:
    return apply_affine(matrix, torch.as_tensor(np.asarray(stored_points), dtype=torch.float64)).numpy()


class BundleLandmarker:
    """A bundle on torch, for `medsapiens predict`: images from medsapiens.io.imageio -> original pixels.
    medsapiens.deploy.runtime.OnnxLandmarker is its onnxruntime twin."""

    def __init__(self, bundle_dir, device="cpu", flip_test: bool = True):
        self.model, self.bundle = bundlelib.load(bundle_dir, device)
        self.device = device
        self.heads = self.bundle.heads
        self.landmark_sets = self.bundle.landmark_sets
        self.calibration = self.bundle.calibration
        self.flip_test = {d: flip_test and s.can_flip for d, s in self.landmark_sets.items()}

    def prepare(self, image) -> EvalExample:
        """The model input and affine of an image from medsapiens.io.imageio: all a prediction keeps of it."""
        return eval_example(image, {}, self.bundle.input_size, self.bundle.codec.margin)

    def predict(self, examples: list[EvalExample], dataset: str) -> tuple[np.ndarray, np.ndarray]:
        """(landmarks (B, K, 2) in original pixels, scores (B, K)) of images made ready by `prepare`."""
        perm = self.landmark_sets[dataset].flip_permutation() if self.flip_test[dataset] else None
        heat = predict_heatmaps(self.model, torch.stack([e.image for e in examples]).to(self.device), dataset,
                                self.model.dataset_ids.index(dataset), perm)
        return heatmaps_to_image(heat, torch.stack([e.matrix for e in examples]), self.bundle.input_size,
                                 self.bundle.codec.blur_kernel)
