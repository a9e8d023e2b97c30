"""ONNX export of a bundle: the network and its DARK-UDP decoding in one graph.

The graph takes the preprocessed input (medsapiens.data.preprocess: float32 (B, 3, H, W), dynamic B) and
gives, per exported head, `<dataset>_landmarks` (B, K, 2) in input pixels and `<dataset>_scores`
(B, K): exported pose models that stop at the heatmaps leave decoding to each user and get it wrong.
The model's metadata (`medsapiens` key, JSON) documents the preprocessing, the landmark sets, the
heads, the input size, the codec settings, flip test and the bundle's calibration; `medsapiens
predict --onnx` reads nothing else (medsapiens.deploy.runtime).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from medsapiens.data import preprocess
from medsapiens.data.codec import decode_udp, flip_heatmaps, heatmap_to_input
from medsapiens.data.pipeline import heatmap_size
from medsapiens.errors import InputError
from medsapiens.io import registry, storage
from medsapiens.model import bundle as bundlelib

METADATA_KEY = "medsapiens"
EXTERNAL_DATA_OVER = 3 << 29  # 1.5 GiB of weights: beyond, they go beside the model (protobuf stops at 2 GiB)
FORMAT = "medsapiens-onnx"
VERSION = 1
OPSET = 18


class LandmarkGraph(nn.Module):
    """Preprocessed images -> (landmarks in input pixels, scores) for each chosen head, flip test inside."""

    def __init__(self, model, bundle: bundlelib.Bundle, datasets: list[str], flip_test: bool):
        super().__init__()
        self.model = model
        self.datasets = datasets
        self.input_size = bundle.input_size
        self.blur_kernel = bundle.codec.blur_kernel
        sets = bundle.landmark_sets
        self.permutations = {d: sets[d].flip_permutation() if flip_test and sets[d].can_flip else None
                             for d in datasets}

    def heatmaps(self, shared: torch.Tensor, shared_flipped, dataset: str) -> torch.Tensor:
        head = self.model.decoder.heads[dataset]
        heat = head(shared).float()
        if self.permutations[dataset] is not None:
            heat = (heat + flip_heatmaps(head(shared_flipped).float(), self.permutations[dataset])) / 2
        return heat

    def forward(self, images: torch.Tensor):
        trunk = lambda x: self.model.decoder.trunk(self.model.backbone(x))  # noqa: E731
        shared_flipped = None
        if any(p is not None for p in self.permutations.values()):
            # one pass over images and mirrors: the backbone appears once in the graph, not twice
            both, batch = trunk(torch.cat([images, images.flip(-1)])), images.shape[0]
            shared, shared_flipped = both[:batch], both[batch:]
        else:
            shared = trunk(images)
        outputs = []
        for dataset in self.datasets:
            keypoints, scores = decode_udp(self.heatmaps(shared, shared_flipped, dataset), self.blur_kernel)
            in_pixels = heatmap_to_input(keypoints, self.input_size, heatmap_size(self.input_size)).float()
            outputs += [in_pixels, scores]
        return tuple(outputs)


def output_names(datasets: list[str]) -> list[str]:
    return [f"{d}_{what}" for d in datasets for what in ("landmarks", "scores")]


def metadata(bundle: bundlelib.Bundle, datasets: list[str], flip_test: bool, source: str) -> dict:
    sets = bundle.landmark_sets
    return {
        "format": FORMAT, "version": VERSION, "bundle": source,
        "input": {"name": "images", "size": list(bundle.input_size), "layout": "NCHW", "dtype": "float32",
                  "mean": list(preprocess.IMAGENET_MEAN), "std": list(preprocess.IMAGENET_STD),
                  "margin": bundle.codec.margin, "preprocessing": preprocess.DESCRIPTION},
        "heads": {d: sets[d].num_landmarks for d in datasets},
        "outputs": {d: {"landmarks": f"{d}_landmarks", "scores": f"{d}_scores",
                        "landmarks_unit": "input pixels, (x, y), pixel centres on integers",
                        "scores_meaning": "heatmap maximum"} for d in datasets},
        "codec": {"sigma": bundle.codec.sigma, "blur_kernel": bundle.codec.blur_kernel, "decoding": "DARK-UDP",
                  "heatmap_size": list(heatmap_size(bundle.input_size))},
        "flip_test": {d: bool(flip_test and sets[d].can_flip) for d in datasets},
        "landmark_sets": {d: sets[d].to_dict() for d in datasets},
        "calibration": {d: record for d in datasets
                        if (record := registry.record_for(bundle.calibration, d, flip_test and sets[d].can_flip))},
    }


def export_onnx(bundle_dir, out_path, dataset: str | None = None, flip_test: bool = True, force: bool = False) -> Path:
    """Write the ONNX model of a bundle (one head, or every head when `dataset` is None); an existing
    file at `out_path` only with `force`."""
    out = Path(out_path)
    storage.check_new_file(out, "MODEL.onnx", force)
    try:
        import onnx  # noqa: F401 - save_onnx needs it
        import onnxscript  # noqa: F401 - torch's dynamo exporter needs it
    except ImportError as exc:
        raise InputError(f"export onnx needs {exc.name}: pip install 'medsapiens[onnx]'") from None

    model, bundle = bundlelib.load(bundle_dir)
    if dataset is not None and dataset not in bundle.heads:
        raise InputError(f"the bundle {bundle_dir} has no head {dataset!r} (heads: {', '.join(bundle.heads)})")
    datasets = [dataset] if dataset else list(bundle.heads)
    graph = LandmarkGraph(model, bundle, datasets, flip_test).eval()
    w, h = bundle.input_size
    example = torch.zeros(2, 3, h, w)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation and tracer chatter
        program = torch.onnx.export(graph, (example,), input_names=["images"], output_names=output_names(datasets),
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
                                    opset_version=OPSET, dynamo=True, verbose=False, optimize=True)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata(bundle, datasets, flip_test, str(bundle_dir)))
    weight_bytes = sum(t.numel() * t.element_size() for t in graph.state_dict().values())
    save_onnx(proto, out, external=weight_bytes > EXTERNAL_DATA_OVER)
    return out


def save_onnx(proto, out: Path, external: bool) -> None:
    """Check and write the model. With `external` its weights go to OUT.data beside it (ONNX external data,
    which onnxruntime reads from the model's folder): protobuf serializes no message over 2 GiB."""
    import onnx

    data = out.with_name(f"{out.name}.data")
    data.unlink(missing_ok=True)  # an earlier export's weights
    if external:
        onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
        onnx.checker.check_model(str(out))
    else:
        onnx.checker.check_model(proto)
        onnx.save(proto, str(out))
