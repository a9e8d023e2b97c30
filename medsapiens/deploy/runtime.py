"""An exported model (medsapiens.deploy.export) run by onnxruntime: no torch import anywhere on this path.

Reads the model's `medsapiens` metadata (landmark sets, input size, margin, flip test, calibration),
preprocesses with medsapiens.data.preprocess and maps the graph's input-pixel landmarks back to
original pixels through the inverse of each image's affine.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medsapiens.data import preprocess
from medsapiens.errors import InputError
from medsapiens.io.registry import LandmarkSet

METADATA_KEY = "medsapiens"  # as medsapiens.deploy.export writes it (that module imports torch)
FORMAT = "medsapiens-onnx"


class OnnxLandmarker:
    def __init__(self, path, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError("--onnx needs onnxruntime: pip install 'medsapiens[onnx]'") from None
        if not Path(path).is_file():
            raise FileNotFoundError(f"no ONNX model {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds for a bad file
            raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.meta = json.loads(meta) if meta else {}
        if self.meta.get("format") != FORMAT:
            raise InputError(f"{path}: not exported by `medsapiens export onnx` (no {METADATA_KEY!r} metadata)")
        self.input_size = tuple(self.meta["input"]["size"])
        self.margin = float(self.meta["input"]["margin"])
        self.heads = dict(self.meta["heads"])
        self.landmark_sets = {d: LandmarkSet.from_dict(v) for d, v in self.meta["landmark_sets"].items()}
        self.flip_test = dict(self.meta["flip_test"])
        self.calibration = self.meta.get("calibration") or {}

    def inputs(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(stacked model inputs, each image's affine) for images from medsapiens.io.imageio."""
        pairs = [preprocess.model_input(image, self.input_size, self.margin) for image in images]
        return np.stack([x for x, _ in pairs]), [m for _, m in pairs]

    def run_inputs(self, batch: np.ndarray, dataset: str) -> tuple[np.ndarray, np.ndarray]:
        """(landmarks (B, K, 2) in input pixels, scores (B, K)) of preprocessed inputs."""
        outputs = self.meta["outputs"][dataset]
        landmarks, scores = self.session.run([outputs["landmarks"], outputs["scores"]], {"images": batch})
        return landmarks, scores

    def predict(self, images: list[np.ndarray], dataset: str) -> tuple[np.ndarray, np.ndarray]:
        """(landmarks (B, K, 2) in original pixels, scores (B, K))."""
        batch, matrices = self.inputs(images)
        landmarks, scores = self.run_inputs(batch, dataset)
        original = np.stack([preprocess.apply_affine(np.linalg.inv(m), p) for m, p in zip(matrices, landmarks, strict=True)])
        return original, scores
