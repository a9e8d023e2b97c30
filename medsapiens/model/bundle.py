"""The bundle: the contract between pretraining and fine-tuning/evaluation/prediction.

A directory with `model.safetensors` (backbone + shared trunk + every head, fp32) and
`config.json` (architecture, input size, heads {dataset: K}, codec settings, the landmark-set
registry entries of its heads, provenance). Loading it needs no pickle.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medsapiens import distributed
from medsapiens.errors import InputError
from medsapiens.io import storage
from medsapiens.io.registry import LandmarkSet
from medsapiens.model import ModelConfig, feature_grid
from medsapiens.model.weights import refuse_non_finite

FORMAT = "medsapiens-bundle"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass
class CodecSettings:
    sigma: float = 3.0
    margin: float = 1.25
    blur_kernel: int = 11

    @classmethod
    def of(cls, data) -> "CodecSettings":
        """The settings a model trained with this DataConfig was trained (and should be read) with."""
        return cls(sigma=data.sigma, margin=data.augment.margin)


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


def read_config(path: str | Path) -> Bundle:
    path = Path(path)
    try:
        d = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a bundle: no {CONFIG} (export one with `medsapiens pretrain export`)") from None
    if d.get("format") != FORMAT or d.get("version") != VERSION:
        raise InputError(f"{path / CONFIG}: not a {FORMAT} v{VERSION} config")
    model = dict(d["model"])
    heads = model.pop("heads")
    sets = {k: LandmarkSet.from_dict(v) for k, v in d["landmark_sets"].items()}
    if {k: s.num_landmarks for k, s in sets.items()} != heads:
        raise InputError(f"{path / CONFIG}: heads {heads} disagree with the landmark sets")
    model["img_size"] = tuple(model["img_size"])
    return Bundle(ModelConfig(**model), sets, CodecSettings(**d["codec"]), d.get("provenance", {}),
                  d.get("calibration", {}))


def load(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, Bundle) from a bundle directory; a CUDA `device` becomes the current one."""
    device = distributed.use_device(device)
    bundle = read_config(path)
    model = bundle.model.build(bundle.heads)
    state = load_file(str(Path(path) / WEIGHTS), device="cpu")
    refuse_non_finite(state, Path(path) / WEIGHTS)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(f"{path}/{WEIGHTS} does not match its config: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return model.to(device).eval(), bundle
