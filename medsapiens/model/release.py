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

Reading: `torch_files.read_checkpoint`, which reads mmengine's extra objects without running them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medsapiens.errors import InputError
from medsapiens.io import registry
from medsapiens.io.shard_tar import file_digest
from medsapiens.model import DEFAULT_IMG_SIZE, LandmarkModel, ModelConfig, MultiHeadDecoder, build_backbone, get_arch
from medsapiens.model import bundle as bundlelib
from medsapiens.model.torch_files import read_checkpoint
from medsapiens.model.weights import FROM_ELSEWHERE, load_checkpoint, refuse_non_finite, state_dict_in

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
    force: bool = False,
) -> ReleaseReport:
    """Write the bundle of a released MedSapiens checkpoint (see the module docstring); a bundle already
    at `out` is replaced only with `force`."""
    arch = get_arch(arch)
    if arch.family != "sapiens":
        raise InputError(f"--arch {arch.name}: the MedSapiens releases are LoRA adapters of a Sapiens (v1) backbone, "
                         "e.g. sapiens_0.3b")
    out = Path(out)
    held = bundlelib.check_folder(out)
    if held and not force:
        raise InputError(f"--out {out} already holds {' and '.join(held)}: pass --force to replace them, or give "
                         "another --out")
    img_size = (int(img_size[0]), int(img_size[1]))
    for label, path in (("checkpoint", checkpoint), ("base checkpoint", base)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{label} {path}: no such file")
    obj, loader = read_checkpoint(checkpoint)
    state = state_dict_in(obj, checkpoint)
    width, channels = check_state(state, arch, checkpoint)
    refuse_non_finite(state, checkpoint, FROM_ELSEWHERE)  # its adapters and head; the base is checked as it loads
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
