"""The released MedSapiens checkpoints (xmed-lab/MedSapiens) as a bundle.

Those are mmengine checkpoints (`ckpt["state_dict"]`, plus `meta`, `message_hub`, ...) of a
Sapiens pose model whose ViT was frozen under LoRA: the state dict holds only the adapters,
`backbone.module.layers.{i}.attn.{qkv,proj}.lora_{down,up}.weight`, and the heatmap head,
`head.{deconv_layers.{0,3},conv_layers.{0,3},final_layer}.*`. The frozen ViT is the released
Sapiens checkpoint the run started from (`--base`). Converting:

- the base is loaded with `load_backbone`'s loader (pos_embed resized to the bundle's grid), then
  every adapter is merged: W += up @ down * LORA_SCALING (in float64, then cast);
- the head's trunk becomes `decoder.trunk.{0..3}.conv.*` (the ConvTranspose2d weights share
  PyTorch's (in, out, kH, kW) layout, so they copy as they are);
- the final 1x1 conv is split into one head per dataset: the multi-dataset model's 88 channels are
  head 0-18, chest 19-24, hand 25-61, leg 62-87; a per-dataset (stage-2) checkpoint is one head.

Reading: `torch.load(weights_only=True)` first. mmengine also pickles objects that it refuses
(HistoryBuffer in `message_hub`, numpy scalars in `meta`); those files are read by a restricted
unpickler that resolves only tensor rebuilding and plain containers and stands an inert
placeholder in for every other global: nothing named in the file is imported or called.
"""
from __future__ import annotations

import pickle
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from medsapiens.errors import InputError
from medsapiens.io import registry
from medsapiens.io.shard_tar import file_digest
from medsapiens.model import DEFAULT_IMG_SIZE, LandmarkModel, ModelConfig, MultiHeadDecoder, build_backbone, get_arch
from medsapiens.model import bundle as bundlelib
from medsapiens.model.weights import check_torch_zip, load_checkpoint, state_dict_in, weights_only_refusal

STAGE = "medsapiens-release"
MULTI_DATASET_ORDER = ("head", "chest", "hand", "leg")  # MedSapiens' 88-channel final layer
LORA_SCALING = 1.0  # alpha / rank of both released adapters: qkv 4 / 4, proj 8 / 8
LORA_PREFIX = "backbone.module.layers."
LORA_TARGETS = ("qkv", "proj")
FINAL = "head.final_layer."
TRUNK = {  # our decoder key -> the Sapiens HeatmapHead key
    "trunk.0.conv.weight": "head.deconv_layers.0.weight",
    "trunk.1.conv.weight": "head.deconv_layers.3.weight",
    "trunk.2.conv.weight": "head.conv_layers.0.weight",
    "trunk.2.conv.bias": "head.conv_layers.0.bias",
    "trunk.3.conv.weight": "head.conv_layers.3.weight",
    "trunk.3.conv.bias": "head.conv_layers.3.bias",
}
CODEC = bundlelib.CodecSettings(sigma=3.0, margin=1.25, blur_kernel=11)  # MedSapiens' UDP codec, bbox padding


@dataclass
class ReleaseReport:
    out: Path
    heads: dict[str, tuple[int, int]]  # dataset -> its channels [start, stop) in the final layer
    lora_merged: int
    trunk_width: int
    loader: str
    base_summary: str

    def summary(self) -> str:
        heads = ", ".join(f"{d} (channels {a}-{b - 1})" for d, (a, b) in self.heads.items())
        return "\n".join([self.base_summary, f"read with {self.loader}",
                          f"merged {self.lora_merged // 2} LoRA deltas ({self.lora_merged} tensors, "
                          f"scaling {LORA_SCALING}); trunk width {self.trunk_width}; heads: {heads}"])


def convert_release(
    checkpoint: str | Path,
    base: str | Path,
    out: str | Path,
    arch: str = "sapiens_0.3b",
    img_size: tuple[int, int] = DEFAULT_IMG_SIZE,
    dataset: str | None = None,
) -> ReleaseReport:
    """Write the bundle of a released MedSapiens checkpoint (see the module docstring)."""
    arch = get_arch(arch)
    img_size = (int(img_size[0]), int(img_size[1]))
    for label, path in (("checkpoint", checkpoint), ("base checkpoint", base)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{label} {path}: no such file")
    obj, loader = read_checkpoint(checkpoint)
    state = state_dict_in(obj, checkpoint)
    width, channels = check_state(state, arch, checkpoint)
    heads = head_channels(channels, dataset, checkpoint)

    backbone = build_backbone(arch, img_size)
    try:
        report = load_checkpoint(backbone, base)
    except ValueError as e:
        raise InputError(f"base checkpoint: {e}") from None
    if not report.complete:
        raise InputError(f"base {base} is not a Sapiens {arch.name} backbone: "
                         + "; ".join(line.strip() for line in report.summary().splitlines()))
    merged = merge_lora_deltas(backbone, state)

    decoder = MultiHeadDecoder(backbone.embed_dim, {d: b - a for d, (a, b) in heads.items()}, width)
    weights = {ours: state[theirs] for ours, theirs in TRUNK.items()}
    for d, (a, b) in heads.items():
        weights[f"heads.{d}.weight"] = state[FINAL + "weight"][a:b]
        weights[f"heads.{d}.bias"] = state[FINAL + "bias"][a:b]
    decoder.load_state_dict(weights, strict=True)
    model = LandmarkModel(backbone, decoder)

    provenance = {
        "stage": STAGE,
        "source": {"path": str(Path(checkpoint).resolve()), "sha256": file_digest(checkpoint)[0]},
        "base": {"path": str(Path(base).resolve()), "sha256": file_digest(base)[0]},
        "lora_merged": merged,
        "lora_scaling": LORA_SCALING,
        "final_layer_channels": channels,
        "heads": {d: {"channels": [a, b]} for d, (a, b) in heads.items()},
        "checkpoint_meta": _plain_meta(obj),
        "loader": loader,
    }
    config = ModelConfig(arch=arch.name, img_size=img_size, trunk_width=width)
    bundle = bundlelib.Bundle(config, {d: registry.get(d) for d in heads}, CODEC, provenance)
    bundlelib.save(out, model, bundle)
    return ReleaseReport(Path(out), heads, merged, width, loader, report.summary())


def read_checkpoint(path: str | Path):
    """(the unpickled object, how it was read). weights_only first, then the restricted loader."""
    try:
        check_torch_zip(str(path))
        return torch.load(path, map_location="cpu", weights_only=True), "torch.load(weights_only=True)"
    except InputError:
        raise
    except pickle.UnpicklingError as e:
        refused = weights_only_refusal(e)
    except Exception as e:  # not a torch file at all
        raise InputError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    placeholders: list[str] = []
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False,
                         pickle_module=_restricted_pickle(placeholders))
    except Exception as e:
        raise InputError(f"{path}: cannot be read safely ({type(e).__name__}: {e})") from None
    names = sorted(set(placeholders))
    return obj, (f"the restricted loader (weights_only=True refused: {refused}); "
                 f"{len(names)} global(s) left as inert placeholders: {', '.join(names)}")


def expected_keys(depth: int) -> list[str]:
    keys = [f"{LORA_PREFIX}{i}.attn.{t}.lora_{p}.weight" for i in range(depth) for t in LORA_TARGETS
            for p in ("down", "up")]
    return keys + list(TRUNK.values()) + [FINAL + "weight", FINAL + "bias"]


def check_state(state: dict[str, torch.Tensor], arch, path) -> tuple[int, int]:
    """Refuse a state dict that is not exactly the LoRA + heatmap head of `arch`; (trunk width, K)."""
    expected = expected_keys(arch.depth)
    if not any(k.startswith((LORA_PREFIX, "head.")) for k in state):
        raise InputError(f"{path}: not a MedSapiens checkpoint (no {LORA_PREFIX}*.lora_* or head.* keys); "
                         "a Sapiens backbone converts with --from sapiens")
    missing = [k for k in expected if k not in state]
    if missing:
        raise InputError(f"{path}: missing {_first(missing)}; a LoRA MedSapiens checkpoint of {arch.name} "
                         f"has {len(expected)} tensors")
    known = set(expected)
    unexpected = [k for k in state if k not in known]
    if unexpected:
        raise InputError(f"{path}: unexpected {_first(unexpected)} for a LoRA MedSapiens checkpoint of "
                         f"{arch.name} (is --arch right?)")
    c = arch.embed_dim
    width = _dim(state["head.conv_layers.0.weight"], 0)
    channels = _dim(state[FINAL + "weight"], 0)
    shapes = {
        "head.deconv_layers.0.weight": (c, width, 4, 4), "head.deconv_layers.3.weight": (width, width, 4, 4),
        "head.conv_layers.0.weight": (width, width, 1, 1), "head.conv_layers.0.bias": (width,),
        "head.conv_layers.3.weight": (width, width, 1, 1), "head.conv_layers.3.bias": (width,),
        FINAL + "weight": (channels, width, 1, 1), FINAL + "bias": (channels,),
    }
    for i in range(arch.depth):
        for target, out in zip(LORA_TARGETS, (3 * c, c), strict=True):
            down = f"{LORA_PREFIX}{i}.attn.{target}.lora_down.weight"
            rank = _dim(state[down], 0)
            shapes[down] = (rank, c)
            shapes[down.replace("lora_down", "lora_up")] = (out, rank)
    for key, shape in shapes.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape or min(shape) < 1:
            raise InputError(f"{path}: {key!r} has shape {tuple(tensor.shape)}, expected {shape} "
                             f"({arch.name}: embed {c}; trunk width {width}, {channels} landmark channels)")
        if not tensor.is_floating_point():
            raise InputError(f"{path}: {key!r} is {tensor.dtype}, not floating point")
    return width, channels


def head_channels(channels: int, dataset: str | None, path) -> dict[str, tuple[int, int]]:
    """dataset -> [start, stop) in the final layer. 88 channels: the four MedSapiens sets (or just
    `dataset`'s slice of them); otherwise one per-dataset head, which `dataset` must name."""
    if dataset is not None and dataset not in registry.BUILTIN:
        raise InputError(f"unknown dataset {dataset!r}; built-in ones: {', '.join(registry.BUILTIN)}")
    spans, start = {}, 0
    for d in MULTI_DATASET_ORDER:
        k = registry.get(d).num_landmarks
        spans[d], start = (start, start + k), start + k
    if channels == start:
        if dataset is None:
            return spans
        if dataset in spans:
            return {dataset: spans[dataset]}
        raise InputError(f"{path}: the {start}-channel multi-dataset model has heads "
                         f"{', '.join(MULTI_DATASET_ORDER)}, not {dataset!r}")
    sizes = ", ".join(f"{d} {registry.get(d).num_landmarks}" for d in MULTI_DATASET_ORDER)
    if dataset is None:
        raise InputError(f"{path}: final layer has {channels} channels, not the {start} of the multi-dataset "
                         f"model: name its dataset with --dataset ID ({sizes})")
    k = registry.get(dataset).num_landmarks
    if channels != k:
        raise InputError(f"{path}: final layer has {channels} channels but {dataset!r} has {k} landmarks ({sizes})")
    return {dataset: (0, k)}


def merge_lora_deltas(backbone, state: dict[str, torch.Tensor]) -> int:
    """W += up @ down * LORA_SCALING for every block's attn.qkv and attn.proj; the count merged."""
    merged = 0
    with torch.no_grad():
        for i, block in enumerate(backbone.blocks):
            for target in LORA_TARGETS:
                linear = getattr(block.attn, target)
                down = state[f"{LORA_PREFIX}{i}.attn.{target}.lora_down.weight"].double()
                up = state[f"{LORA_PREFIX}{i}.attn.{target}.lora_up.weight"].double()
                linear.weight.copy_(linear.weight.double() + (up @ down) * LORA_SCALING)
                merged += 2
    return merged


def _first(keys: list[str]) -> str:
    return f"{keys[0]!r}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")


def _dim(tensor: torch.Tensor, axis: int) -> int:
    return tensor.shape[axis] if tensor.dim() > axis else -1


def _plain_meta(obj) -> dict:
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return {}
    return {k: meta[k] for k in ("epoch", "iter", "mmengine_version") if type(meta.get(k)) in (int, str)}


# The restricted loader. torch.load unpickles with `pickle_module.Unpickler` (storages still come
# from torch's own persistent_load and storage types); this one resolves the globals below and
# nothing else.


class _Inert:
    """Stands in for a global the file names: takes any arguments and any state, and does nothing."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<not loaded: {self.global_name}>"


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor{,_v2} without requires_grad, hooks or metadata."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a tensor's storage is a {type(storage).__name__}")
    return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"a parameter's data is a {type(data).__name__}")
    return data


_RESOLVED = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
}


def _restricted_pickle(placeholders: list[str]):
    """A stand-in for the `pickle` module whose Unpickler records each unresolved global's name. The
    pure-Python unpickler: its memo is a dict, where C's is a table sized by the largest index a file
    names (a few bytes asking for gigabytes)."""

    class Unpickler(pickle._Unpickler):
        def find_class(self, module, name):
            full = f"{module}.{name}"
            if full in _RESOLVED:
                return _RESOLVED[full]
            placeholders.append(full)
            return type("Placeholder", (_Inert,), {"global_name": full})

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__=f"{__name__}.restricted_pickle", Unpickler=Unpickler, load=load)
