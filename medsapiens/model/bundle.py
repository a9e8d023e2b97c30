"""The bundle: the contract between pretraining and fine-tuning/evaluation/prediction.

A directory with `model.safetensors` (backbone + shared trunk + every head, fp32) and
`config.json` (architecture, input size, heads {dataset: K}, codec settings, the landmark-set
registry entries of its heads, provenance). Loading it needs no pickle.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medsapiens import distributed
from medsapiens.data.preprocess import check_margin
from medsapiens.errors import InputError
from medsapiens.io import jsondoc, storage
from medsapiens.io.record import is_finite_number, is_whole
from medsapiens.io.registry import LandmarkSet, check_calibrations
from medsapiens.model import ModelConfig, feature_grid
from medsapiens.model.weights import refuse_non_finite

FORMAT = "medsapiens-bundle"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MAX_BLUR_KERNEL = 255  # DARK's blur before the Taylor step: 11 in the recipe
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors' names; the bundle writes F32


@dataclass
class CodecSettings:
    sigma: float = 3.0
    margin: float = 1.25
    blur_kernel: int = 11

    @classmethod
    def of(cls, data) -> "CodecSettings":
        """The settings a model trained with this DataConfig was trained (and should be read) with."""
        return cls(sigma=data.sigma, margin=data.augment.margin)

    def check(self) -> None:
        if not (is_finite_number(self.sigma) and self.sigma > 0):
            raise ValueError(f"codec: sigma must be a positive number, got {self.sigma!r}")
        check_margin("codec.margin", self.margin)
        if not is_whole(self.blur_kernel) or not 1 <= self.blur_kernel <= MAX_BLUR_KERNEL or self.blur_kernel % 2 == 0:
            raise ValueError(f"codec: blur_kernel must be an odd number from 1 to {MAX_BLUR_KERNEL}, got {self.blur_kernel!r}")


@dataclass
class Bundle:
    model: ModelConfig
    landmark_sets: dict[str, LandmarkSet]
    codec: CodecSettings = field(default_factory=CodecSettings)
    provenance: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)  # {dataset: conformal radii}; empty: none (medsapiens.evaluation.conformal)

    @property
    def heads(self) -> dict[str, int]:
        return {d: s.num_landmarks for d, s in self.landmark_sets.items()}

    @property
    def input_size(self) -> tuple[int, int]:
        return self.model.input_size

    def to_dict(self) -> dict:
        model = asdict(replace(self.model, checkpoint=None))
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": {**model, "img_size": list(model["img_size"]), "heads": self.heads},
            "codec": asdict(self.codec),
            "landmark_sets": {d: s.to_dict() for d, s in self.landmark_sets.items()},
            "provenance": self.provenance,
            **({"calibration": self.calibration} if self.calibration else {}),
        }


def save(out_dir: str | Path, model: torch.nn.Module, bundle: Bundle) -> Path:
    """Write weights and config under temporary names, then rename: a bundle is never half written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    missing = set(bundle.heads) - {k.split(".")[2] for k in state if k.startswith("decoder.heads.")}
    if missing:
        raise InputError(f"bundle config lists head(s) {sorted(missing)} that the model does not have")
    grid = feature_grid(bundle.model.img_size)
    weights, config = out / f".{WEIGHTS}.tmp", out / f".{CONFIG}.tmp"
    with storage.local_write(out, weights, config):
        save_file(state, str(weights), metadata={"format": FORMAT, "pos_embed_grid": f"{grid[0]}x{grid[1]}"})
        storage.as_umask_allows(weights)
        config.write_text(json.dumps(bundle.to_dict(), indent=2))
    os.replace(weights, out / WEIGHTS)
    os.replace(config, out / CONFIG)
    return out


def check_folder(out: Path) -> list[str]:
    """A bundle goes into a folder of its own: absent, empty or a bundle's; never a file, a run or shard
    directory, or a folder of other files. Returns the bundle's file names it holds already."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; a bundle is a folder")
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    others = [name for name in held if name not in (WEIGHTS, CONFIG)]
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise InputError(f"--out {out} holds {others[0]}{more}, not a bundle's files: a bundle needs a folder of its "
                         "own (e.g. RUN_DIR/bundle)")
    return held


def holds_weights(path: str | Path, model: torch.nn.Module) -> bool:
    """True when the bundle at `path` holds exactly `model`'s weights (compared one tensor at a time)."""
    state = model.state_dict()
    with safe_open(str(Path(path) / WEIGHTS), "pt", device="cpu") as saved:
        return set(saved.keys()) == set(state) and all(
            torch.equal(saved.get_tensor(k), state[k].detach().float().cpu()) for k in state)


def write_config(path: str | Path, bundle: Bundle) -> None:
    """Rewrite a bundle's config.json (e.g. with a calibration added), atomically; weights untouched."""
    path = Path(path)
    (path / f".{CONFIG}.tmp").write_text(json.dumps(bundle.to_dict(), indent=2))
    os.replace(path / f".{CONFIG}.tmp", path / CONFIG)


BUNDLE_KEYS = {"format", "version", "model", "codec", "landmark_sets", "provenance", "calibration"}


def read_config(path: str | Path) -> Bundle:
    """A bundle's config.json, every field checked: a file from elsewhere is refused in one line naming
    the file and the field, before any model is built from it."""
    where = Path(path) / CONFIG
    if Path(path).exists() and not Path(path).is_dir():
        raise InputError(f"{path} is not a bundle: a bundle is a folder holding {CONFIG} and {WEIGHTS}")
    try:
        d = jsondoc.read(where, where)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a bundle: no {CONFIG} (export one with `medsapiens pretrain export`)") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
        raise InputError(f"{where}: not a {FORMAT} v{VERSION} config")
    try:
        return parse_config(d)
    except (KeyError, TypeError, ValueError) as exc:  # InputError is a ValueError
        reason = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise InputError(f"{where}: {reason}") from None


def parse_config(d: dict) -> Bundle:
    unknown = set(d) - BUNDLE_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}")
    model = dict(d["model"])
    heads = model.pop("heads")
    for section, given, known in (("model", model, ModelConfig), ("codec", d["codec"], CodecSettings)):
        unknown = set(given) - {f.name for f in fields(known)}
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(f'{section}.{k}' for k in sorted(unknown))}")
    if not isinstance(model["img_size"], list):
        raise ValueError(f"model.img_size must be [H, W], got {model['img_size']!r}")
    # The bundle's weights are its model.safetensors: a checkpoint path here would only make it read another file.
    model_cfg = ModelConfig(**{**model, "img_size": tuple(model["img_size"]), "checkpoint": None})
    model_cfg.check()
    sets = {k: LandmarkSet.from_dict(v) for k, v in dict(d["landmark_sets"]).items()}
    if {k: s.num_landmarks for k, s in sets.items()} != heads:
        raise ValueError(f"heads {heads} disagree with the landmark sets")
    codec = CodecSettings(**d["codec"])
    codec.check()
    calibration = check_calibrations(d.get("calibration") or {}, sets)
    provenance = d.get("provenance", {})
    if not isinstance(provenance, dict):
        raise ValueError("provenance must be an object")
    return Bundle(model_cfg, sets, codec, provenance, calibration)


def load(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, Bundle) from a bundle directory; a CUDA `device` becomes the current one.
    The weights file's tensors are held against the config's model (names, shapes, floating point)
    from its header, before the model is built or a tensor is read."""
    device = distributed.use_device(device)
    bundle = read_config(path)
    weights = weights_file(path)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in bundle.model.build(bundle.heads).state_dict().items()}
    check_weights_header(weights, expected)
    model = bundle.model.build(bundle.heads)
    state = load_file(str(weights), device="cpu")
    refuse_non_finite(state, weights)
    model.load_state_dict(state)
    return model.to(device).eval(), bundle


def weights_file(path: str | Path) -> Path:
    """The bundle's weights file; a folder without one is refused, naming what it lacks."""
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise InputError(f"{path} is not a bundle: no {WEIGHTS} beside its {CONFIG}")
    return weights


def check_weights_header(weights: Path, expected: dict[str, tuple[int, ...]]) -> None:
    try:
        with safe_open(str(weights), "pt", device="cpu") as saved:
            held = {k: (tuple(saved.get_slice(k).get_shape()), saved.get_slice(k).get_dtype()) for k in saved.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own kind for a damaged file
        raise InputError(f"{weights}: not a readable safetensors file ({exc})") from None
    missing, unexpected = sorted(set(expected) - set(held)), sorted(set(held) - set(expected))
    if missing or unexpected:
        raise InputError(f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, (shape, dtype) in held.items():
        if shape != expected[name]:
            raise InputError(f"{weights}: tensor {name!r} has shape {list(shape)}, its config's model {list(expected[name])}")
        if dtype not in FLOAT_DTYPES:
            raise InputError(f"{weights}: tensor {name!r} is {dtype}, not floating point ({', '.join(FLOAT_DTYPES)})")
