"""An exported model (medsapiens.deploy.export) run by onnxruntime: no torch import anywhere on this path.

Reads the model's `medsapiens` metadata (landmark sets, input size, margin, flip test, calibration),
preprocesses with medsapiens.data.preprocess and maps the graph's input-pixel landmarks back to
original pixels through the inverse of each image's affine.
"""
from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path

import numpy as np

from medsapiens.data import preprocess
from medsapiens.errors import InputError
from medsapiens.io import jsondoc
from medsapiens.io.record import is_whole
from medsapiens.io.registry import LandmarkSet, check_calibrations

METADATA_KEY = "medsapiens"  # as medsapiens.deploy.export writes it (that module imports torch)
FORMAT = "medsapiens-onnx"
MEMORY_CAP_ENV = "MEDSAPIENS_ONNX_MEMORY_GB"
MAX_CAP_GB = 1e6  # onnxruntime takes the cap as a 64-bit count of bytes
CGROUP_MEMORY_LIMIT = "/sys/fs/cgroup/memory.max"


class OnnxLandmarker:
    def __init__(self, path, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError("--onnx needs onnxruntime: pip install 'medsapiens[onnx]'") from None
        if Path(path).is_dir():
            raise InputError(f"--onnx {path} is a folder, not an ONNX file: a model bundle goes to --bundle, and "
                             "`medsapiens export onnx BUNDLE --out FILE.onnx` makes the file --onnx takes")
        if not Path(path).is_file():
            raise FileNotFoundError(f"no ONNX model {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 4  # fatal only: each failure is ours to say, in one line
        self.memory_cap = cap_memory(ort)
        options.add_session_config_entry("session.use_env_allocators", "1")  # the capped allocator
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds for a bad file
            raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                             f"{run_failure(str(exc), self.memory_cap)})") from None
        self.path = path
        self.meta, self.landmark_sets = read_metadata(self.session, path)
        self.input_size = tuple(self.meta["input"]["size"])
        self.margin = float(self.meta["input"]["margin"])
        self.heads = dict(self.meta["heads"])
        self.flip_test = dict(self.meta["flip_test"])
        self.calibration = self.meta.get("calibration") or {}

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(model input, its affine) of an image from medsapiens.io.imageio: all a prediction keeps of it."""
        return preprocess.model_input(image, self.input_size, self.margin)

    def run_inputs(self, batch: np.ndarray, dataset: str) -> tuple[np.ndarray, np.ndarray]:
        """(landmarks (B, K, 2) in input pixels, scores (B, K)) of preprocessed inputs."""
        outputs = self.meta["outputs"][dataset]
        try:
            landmarks, scores = self.session.run([outputs["landmarks"], outputs["scores"]], {"images": batch})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds for a graph that fails
            raise InputError(f"{self.path}: head {dataset!r} could not run on {len(batch)} image(s): "
                             f"{run_failure(str(exc), self.memory_cap)}") from None
        expected = (len(batch), self.heads[dataset])
        if landmarks.shape != (*expected, 2) or scores.shape != expected:
            raise InputError(f"{self.path}: head {dataset!r} gave landmarks {landmarks.shape} and scores {scores.shape} "
                             f"for {len(batch)} image(s), not {(*expected, 2)} and {expected}")
        return landmarks, scores

    def predict(self, prepared: list[tuple[np.ndarray, np.ndarray]], dataset: str) -> tuple[np.ndarray, np.ndarray]:
        """(landmarks (B, K, 2) in original pixels, scores (B, K)) of images made ready by `prepare`."""
        landmarks, scores = self.run_inputs(np.stack([x for x, _ in prepared]), dataset)
        original = np.stack([preprocess.apply_affine(np.linalg.inv(matrix), points)
                             for (_, matrix), points in zip(prepared, landmarks, strict=True)])
        return original, scores


def memory_cap() -> int:
    """The bytes onnxruntime may allocate for a model: MEDSAPIENS_ONNX_MEMORY_GB, else 3/4 of the memory
    this process may use (the machine's, or its container's limit when lower)."""
    value = os.environ.get(MEMORY_CAP_ENV, "")
    if not value:
        return usable_memory() * 3 // 4
    try:
        gb = float(value)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and 0 < gb <= MAX_CAP_GB):
        raise InputError(f"{MEMORY_CAP_ENV}={value!r}: must be a number of GB above 0, at most {MAX_CAP_GB:g}")
    return int(gb * 1e9)


def usable_memory() -> int:
    machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path(CGROUP_MEMORY_LIMIT).read_text().strip()
    except OSError:
        return machine
    return min(machine, int(limit)) if limit.isdecimal() else machine  # "max": no limit


@functools.cache
def cap_memory(ort) -> int:
    """One allocator for every session of this process, refusing past memory_cap() (returned): a graph is
    a program, and a 1 KB one can ask for gigabytes (ConstantOfShape), which would otherwise be granted
    until the machine runs out. It serves what a run allocates; some onnxruntime versions place the
    weights there too."""
    cap = memory_cap()
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    # max_mem, arena_extend_strategy 1 (grow by what is asked, not by powers of two), two defaults (-1)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(cap, 1, -1, -1))
    return cap


def run_failure(message: str, cap: int) -> str:
    """onnxruntime's error in a line: an allocation past the cap says so and how to raise it."""
    asked = re.search(r"Available memory of (\d+) is smaller than requested bytes of (\d+)", message)
    if asked:
        return (f"it asked for {gigabytes(int(asked[2]))} with {gigabytes(int(asked[1]))} left of the "
                f"{gigabytes(cap)} it may use (set {MEMORY_CAP_ENV} to allow more)")
    return " ".join(message.split())[:300]


def gigabytes(size: int) -> str:
    return f"{size / 1e9:.3g} GB"


def read_metadata(session, path) -> tuple[dict, dict[str, LandmarkSet]]:
    """The model's metadata, every field the runtime uses checked against the graph: a file from
    elsewhere is refused in one line naming it, before any image is preprocessed for it."""
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    meta = jsondoc.parse(raw, f"{path}: metadata {METADATA_KEY!r}") if raw else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{path}: not exported by `medsapiens export onnx` (no {METADATA_KEY!r} metadata)")
    try:
        return meta, check_metadata(meta, session)
    except (KeyError, TypeError, ValueError) as exc:  # InputError is a ValueError
        reason = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise InputError(f"{path}: metadata {METADATA_KEY!r}: {reason}") from None


def check_metadata(meta: dict, session) -> dict[str, LandmarkSet]:
    """The landmark sets of a model's metadata; a ValueError, TypeError or KeyError names what is wrong."""
    for key in ("input", "heads", "outputs", "flip_test", "landmark_sets"):
        if not isinstance(meta[key], dict):
            raise ValueError(f"{key} must be an object, got {meta[key]!r:.80}")
    check_input(meta["input"], session.get_inputs())
    graph_outputs = {o.name for o in session.get_outputs()}
    if not all(isinstance(v, dict) for v in meta["landmark_sets"].values()):
        raise ValueError("landmark_sets must map each head to an object")
    sets = {d: LandmarkSet.from_dict(v) for d, v in meta["landmark_sets"].items()}
    if {d: s.num_landmarks for d, s in sets.items()} != meta["heads"]:
        raise ValueError(f"heads {meta['heads']} disagree with the landmark sets")
    for dataset in sets:
        outputs = meta["outputs"].get(dataset)
        if not isinstance(outputs, dict):
            raise ValueError(f"outputs has no object for head {dataset!r}")
        names = [outputs.get(k) for k in ("landmarks", "scores")]
        unknown = [n for n in names if not isinstance(n, str) or n not in graph_outputs]
        if unknown:
            raise ValueError(f"outputs of {dataset!r} name {unknown}, not among the graph's {sorted(graph_outputs)}")
        if not isinstance(meta["flip_test"].get(dataset), bool):
            raise ValueError(f"flip_test of {dataset!r} must be true or false")
    check_calibrations(meta.get("calibration") or {}, sets)
    return sets


def check_input(spec: dict, graph_inputs) -> None:
    """input.size [W, H] must be the graph's own (B, 3, H, W) input: the metadata alone never decides
    how large an array is allocated."""
    size, margin = spec["size"], spec["margin"]
    preprocess.check_margin("input.margin", margin)
    if not (isinstance(size, list) and len(size) == 2 and all(is_whole(v) and 0 < v <= preprocess.MAX_INPUT_SIDE
                                                              for v in size)):
        raise ValueError(f"input.size must be [W, H], two integers from 1 to {preprocess.MAX_INPUT_SIDE}, "
                         f"got {size!r:.80}")
    shape = graph_inputs[0].shape if len(graph_inputs) == 1 and graph_inputs[0].name == "images" else None
    if not (shape and len(shape) == 4 and not is_whole(shape[0]) and shape[1] == 3 and is_whole(shape[2])
            and is_whole(shape[3])):
        raise ValueError(f"the graph's input must be one 'images' (B, 3, H, W) of any batch B and fixed H and W, got "
                         f"{[(i.name, i.shape) for i in graph_inputs]}")
    if size != [shape[3], shape[2]]:
        raise ValueError(f"input.size {size} is not the graph's input width and height {[shape[3], shape[2]]}")

