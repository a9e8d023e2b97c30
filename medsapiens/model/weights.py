"""Backbone weights from user-supplied files: the released Sapiens `*_clean.pth`, full pose
checkpoints (`backbone.` / `backbone.module.` prefixes), and safetensors in either key naming.

Everything is renamed to timm's keys; the cls token and the pos_embed's cls slot are dropped and
the pos_embed grid is resized bicubically (align_corners=False, no antialias, float32) to the
model's grid. Files are read as safetensors or by `torch_files.read_checkpoint` (a full mmengine
pose checkpoint included), never by plain pickle.
"""
from __future__ import annotations

import math
import os
import re
import reprlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from medsapiens import distributed
from medsapiens.errors import CheckpointError, InputError
from medsapiens.io.shard_tar import file_digest
from medsapiens.io.storage import as_umask_allows, check_new_file, local_write
from medsapiens.model.archs import DEFAULT_IMG_SIZE, PATCH_SIZE, ArchSpec, feature_grid, get_arch
from medsapiens.model.backbone import Backbone, build_backbone
from medsapiens.model.torch_files import WEIGHTS_ONLY, read_checkpoint

FORMAT = "medsapiens-backbone"
GRID_METADATA_KEY = "pos_embed_grid"
TASK_GRID = feature_grid(DEFAULT_IMG_SIZE)  # 64x48: the grid of Sapiens' pose (and other task) files
READ_BY = "read_by"  # how a torch file was read, where not plainly (never written to a file)
WRAPPER_KEYS = ("state_dict", "model")
SAFETENSORS_HEADER_LIMIT = 100 << 20  # safetensors refuses a header over 100 MB
BACKBONE_PREFIXES = ("backbone.module.", "backbone.")  # longest first
DROPPED_KEYS = ("cls_token",)

# Released (mmpretrain) names -> timm names; timm names pass through unchanged.
RENAMES = (
    (re.compile(r"^patch_embed\.projection\."), "patch_embed.proj."),
    (re.compile(r"^layers\.(\d+)\.ln1\."), r"blocks.\1.norm1."),
    (re.compile(r"^layers\.(\d+)\.ln2\."), r"blocks.\1.norm2."),
    (re.compile(r"^layers\.(\d+)\.attn\."), r"blocks.\1.attn."),
    (re.compile(r"^layers\.(\d+)\.ffn\.layers\.0\.0\."), r"blocks.\1.mlp.fc1."),
    (re.compile(r"^layers\.(\d+)\.ffn\.layers\.1\."), r"blocks.\1.mlp.fc2."),
    (re.compile(r"^ln1\."), "norm."),
)


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        lines = [f"{self.source}: loaded {len(self.loaded)} backbone tensors"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("ignored", self.ignored)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {_abbreviate(keys)}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass
class BackboneState:
    """A checkpoint's backbone tensors under timm names, pos_embed without its cls slot."""

    tensors: dict[str, torch.Tensor]
    file_keys: dict[str, str]  # timm name -> name in the file, for error messages
    grid: tuple[int, int] | None  # the pos_embed's grid; None without a pos_embed
    ignored: list[str]
    notes: list[str]


def is_safetensors(path: str) -> bool:
    """By the file's first bytes, whatever its name: an 8-byte header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < SAFETENSORS_HEADER_LIMIT


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a checkpoint file (safetensors or torch, told by its content) and its safetensors
    metadata (for a torch file, READ_BY when the restricted loader read it). A file neither can read is
    one line naming it."""
    path = str(path)
    if not is_safetensors(path):
        obj, read_by = read_checkpoint(path)
        return state_dict_in(obj, path), ({READ_BY: read_by} if read_by != WEIGHTS_ONLY else {})
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, SafetensorError) as e:  # truncated
        raise InputError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def state_dict_in(obj, path) -> dict[str, torch.Tensor]:
    """The dict of tensors a loaded checkpoint is, or holds under a wrapper key (WRAPPER_KEYS); else one
    line naming the file."""
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a state dict (a dict of tensors), found {reprlib.repr(obj)}: save the "
                         "model's state_dict() alone")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.is_meta:
            raise InputError(f"{path}: entry {key!r} is a {value.layout} tensor{' on the meta device' * value.is_meta}, "
                             "not dense weights")
        if value.untyped_storage().nbytes() < value.numel() * value.element_size():
            raise InputError(f"{path}: entry {key!r} claims {value.numel():,} values over a storage of "
                             f"{value.untyped_storage().nbytes():,} bytes (one value repeated by a zero stride): "
                             "refused, as torch.save never writes a model's weights so")
    return obj


def normalize_state(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    source: str,
    model_grid: tuple[int, int] | None = None,
    family: str = "sapiens",
) -> BackboneState:
    """Select the backbone's tensors; for Sapiens, rename them to timm keys and split off the cls slot
    (Sapiens2 files already carry the model's own keys, cls token included, and no position table).

    model_grid helps to recognise a non-square pos_embed that was saved at the model's grid."""
    prefix_present = any(k.startswith(BACKBONE_PREFIXES) for k in tensors)
    sapiens = family == "sapiens"
    state = BackboneState({}, {}, None, [], [])
    for file_key, tensor in tensors.items():
        key = _strip_backbone_prefix(file_key) if prefix_present else file_key
        if key is None or (sapiens and key in DROPPED_KEYS):
            state.ignored.append(file_key)
            continue
        key = _rename(key) if sapiens else key
        if key in state.tensors:
            raise InputError(f"{source}: {state.file_keys[key]!r} and {file_key!r} are both the backbone's {key!r}: "
                             "keep one of them in the file")
        state.tensors[key] = tensor
        state.file_keys[key] = file_key
    if READ_BY in metadata:
        state.notes.append(f"read by {metadata[READ_BY]}")
    if "pos_embed" in state.tensors:
        state.tensors["pos_embed"], state.grid, note = _split_pos_embed(
            state.tensors["pos_embed"], _metadata_grid(metadata, source), model_grid, source
        )
        if note:
            state.notes.append(note)
    return state


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """(1, gh*gw, C) -> (1, nh*nw, C): bicubic, align_corners=False, no antialias, in float32."""
    (gh, gw), (nh, nw), channels = grid, new_grid, pos_embed.shape[-1]
    image = pos_embed.float().reshape(1, gh, gw, channels).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(nh, nw), mode="bicubic", align_corners=False, antialias=False)
    return image.permute(0, 2, 3, 1).reshape(1, nh * nw, channels).to(pos_embed.dtype)


def load_state(backbone: Backbone, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
               source: str = "state dict") -> LoadReport:
    """Load checkpoint tensors (any supported naming) into `backbone`; see `LoadReport`."""
    state = normalize_state(tensors, metadata or {}, source, backbone.grid_size, backbone.arch.family)
    if state.grid is not None and state.grid != backbone.grid_size:
        state.tensors["pos_embed"] = resize_pos_embed(state.tensors["pos_embed"], state.grid, backbone.grid_size)
        state.notes.append(f"pos_embed resized from {_grid_text(state.grid)} to {_grid_text(backbone.grid_size)}")
    report = compare_with_model(state, backbone.state_dict(), source)
    backbone.load_state_dict({k: state.tensors[k] for k in report.loaded}, strict=False)
    return report


def load_checkpoint(backbone: Backbone, path: str | Path) -> LoadReport:
    tensors, metadata = read_tensors(path)
    return load_state(backbone, tensors, metadata, source=str(path))


def load_backbone(
    arch: str | ArchSpec,
    checkpoint: str | None = None,
    img_size: tuple[int, int] = DEFAULT_IMG_SIZE,
    grad_checkpointing: bool = False,
) -> Backbone:
    """The backbone, with weights from a Sapiens or MedSapiens checkpoint file when one is given.

    A missing or unexpected backbone key is an error; keys outside the backbone (a pose
    checkpoint's head, a bundle's decoder) and the cls token are reported as ignored."""
    backbone = build_backbone(arch, img_size)
    if checkpoint is not None:
        report = load_checkpoint(backbone, checkpoint)
        if not report.complete:
            adapters = any("lora_" in key for key in report.unexpected)
            raise InputError(report.summary() + ("\n  it holds LoRA adapters, not a whole backbone: a MedSapiens release "
                                                 "converts with `medsapiens model convert --from medsapiens`"
                                                 if adapters else ""))
        if distributed.rank() == 0:  # what was resized, dropped or read by the restricted loader
            print(report.summary(), file=sys.stderr)
    backbone.set_grad_checkpointing(grad_checkpointing)
    return backbone


def compare_with_model(state: BackboneState, model_state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Key sets, shapes and kinds of a normalised checkpoint against a model's; a shape clash, whole
    numbers where the model has floats (a quantised file, which loading would cast silently), or a weight
    the model takes that is not finite, raises."""
    for key, tensor in state.tensors.items():
        expected = model_state.get(key)
        if expected is None:
            continue
        if tensor.shape != expected.shape:
            raise InputError(
                f"{source}: {state.file_keys[key]!r} (model key {key!r}) has shape {tuple(tensor.shape)} "
                f"in the checkpoint but {tuple(expected.shape)} in the model"
            )
        if expected.is_floating_point() and not tensor.is_floating_point():
            raise InputError(f"{source}: {state.file_keys[key]!r} holds {tensor.dtype} values, not floating-point "
                             "weights (a quantised checkpoint?): give the full-precision file")
    refuse_non_finite({state.file_keys[k]: state.tensors[k] for k in model_state if k in state.tensors}, source,
                      FROM_ELSEWHERE)
    return LoadReport(
        source=source,
        loaded=[k for k in model_state if k in state.tensors],
        missing=[k for k in model_state if k not in state.tensors],
        unexpected=[state.file_keys[k] for k in state.tensors if k not in model_state],
        ignored=state.ignored,
        notes=state.notes,
    )


def not_a_file(path: str | Path) -> str | None:
    """What a path that should name a weights file names instead ("a folder", "no such file"), or None."""
    if Path(path).is_file():
        return None
    return "a folder" if path and Path(path).is_dir() else "no such file"


def convert_checkpoint(path: str | Path, arch: str | ArchSpec, out: str | Path,
                       trained_size: tuple[int, int] | None = None, force: bool = False) -> LoadReport:
    """Write the backbone of a Sapiens checkpoint as safetensors in timm naming (a Sapiens2 one in its
    own naming, the `backbone.` prefix of a task checkpoint dropped).

    The pos_embed stays at the checkpoint's grid (cls slot dropped); the grid, arch and source are
    recorded in the metadata. `trained_size` (H, W) gives the grid where the file's position table
    cannot (a non-square one). The file must fit `arch` exactly: nothing missing or unexpected. A file
    already at `out` is replaced only with `force`."""
    arch = get_arch(arch)
    if found := not_a_file(path):
        raise InputError(f"checkpoint {path}: {found}; give the Sapiens checkpoint file to convert (.pth or "
                         ".safetensors)")
    check_new_file(Path(out), "BACKBONE.safetensors", force)
    if trained_size is not None and arch.family != "sapiens":
        raise InputError(f"--img-size: a {arch.name} checkpoint has no position table whose grid it would tell; "
                         "convert without it (the backbone takes any input size)")
    tensors, metadata = read_tensors(path)
    if trained_size is not None:
        metadata = with_grid(metadata, feature_grid(trained_size), str(path))
    state = normalize_state(tensors, metadata, str(path), family=arch.family)
    if state.grid is None and arch.family == "sapiens":
        raise InputError(f"{path}: no pos_embed; not a Sapiens backbone checkpoint")
    # the model at the checkpoint's grid; Sapiens2 has no position table: any input size fits its weights
    size = tuple(g * PATCH_SIZE for g in state.grid) if state.grid else DEFAULT_IMG_SIZE
    with torch.device("meta"):
        probe = build_backbone(arch, size)
    report = compare_with_model(state, probe.state_dict(), str(path))
    if not report.complete:
        raise InputError(f"{path} does not fit {arch.name}: "
                         + "; ".join(line.strip() for line in report.summary().splitlines()[1:]))
    out, partial = Path(out), Path(out).with_name(f".{Path(out).name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with local_write(out, partial):
        save_file({k: t.contiguous() for k, t in state.tensors.items()}, str(partial), metadata={
            "format": FORMAT,
            "arch": arch.name,
            **({GRID_METADATA_KEY: _grid_text(state.grid)} if state.grid else {}),
            "source": Path(path).name,
            "source_sha256": file_digest(path)[0],
        })
    os.replace(partial, out)
    as_umask_allows(out)
    return report


def save_backbone(backbone: Backbone, out: str | Path, source: str) -> None:
    """Write a backbone's own weights in the format `convert_checkpoint` produces (loadable as a
    Sapiens checkpoint at any input size: a Sapiens one records its position table's grid)."""
    grid = {GRID_METADATA_KEY: _grid_text(backbone.grid_size)} if backbone.arch.family == "sapiens" else {}
    save_file(
        {k: t.detach().contiguous() for k, t in backbone.state_dict().items()},
        str(out),
        metadata={"format": FORMAT, "arch": backbone.arch.name, **grid, "source": source},
    )
    as_umask_allows(out)


def _strip_backbone_prefix(key: str) -> str | None:
    for prefix in BACKBONE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def _rename(key: str) -> str:
    for pattern, replacement in RENAMES:
        key, count = pattern.subn(replacement, key)
        if count:
            break
    return key


def _split_pos_embed(pos_embed, recorded_grid, model_grid, source):
    """-> (pos_embed without cls slot, its grid, a note or None)."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise InputError(f"{source}: pos_embed has shape {tuple(pos_embed.shape)}, not (1, tokens, channels)")
    tokens = pos_embed.shape[1]
    if recorded_grid and tokens - recorded_grid[0] * recorded_grid[1] not in (0, 1):
        raise InputError(f"{source}: its pos_embed's {tokens} tokens are not a {_grid_text(recorded_grid)} grid "
                         "(the recorded or given one), with or without a cls slot")
    grid = recorded_grid or _infer_grid(tokens, model_grid, source)
    if grid is None:  # a grid _infer_grid reads always fits
        raise InputError(
            f"{source}: pos_embed has shape {tuple(pos_embed.shape)}: its {tokens} tokens are neither "
            f"the model's grid nor a square grid, with or without a cls slot; give the input size it was trained "
            f"at: `medsapiens model convert --img-size H W` records its grid"
        )
    if tokens == grid[0] * grid[1]:
        return pos_embed, grid, None
    return pos_embed[:, 1:], grid, f"pos_embed cls slot dropped ({_grid_text(grid)} grid)"


def _infer_grid(tokens: int, model_grid: tuple[int, int] | None, source: str) -> tuple[int, int] | None:
    """The grid of a position table that records none: a cls slot and a square grid (the released
    pretrained files), the model's own grid (no cls slot), or a square grid; None when none fits. Two
    different grids that both fit are refused: 4096 tokens for a 128x32 model (64x64 or 128x32?), and
    for a model of 3072 patches other than 64x48 (a landscape 48x64, 1536x512's 96x32) the grid of
    Sapiens' task files (64x48 at 1024x768), which fits as well."""
    readings = []
    for patches in (tokens - 1, tokens):  # a cls slot, then none
        side = math.isqrt(max(patches, 0))
        if side > 0 and side * side == patches:
            readings.append((side, side))
    if model_grid and tokens == model_grid[0] * model_grid[1]:
        readings.append(tuple(model_grid))
        if model_grid[0] < model_grid[1]:
            readings.append((model_grid[1], model_grid[0]))
        if tokens == TASK_GRID[0] * TASK_GRID[1]:
            readings.append(TASK_GRID)
    distinct = list(dict.fromkeys(readings))
    if len(distinct) > 1:
        raise InputError(f"{source}: its pos_embed's {tokens} tokens fit a {' and a '.join(map(_grid_text, distinct))} "
                         f"grid; give the input size it was trained at: `medsapiens model convert --img-size H W` "
                         "records its grid")
    return distinct[0] if distinct else None


def with_grid(metadata: dict[str, str], grid: tuple[int, int], source: str) -> dict[str, str]:
    """The metadata recording `grid`, which must be the one it may record already."""
    recorded = _metadata_grid(metadata, source)
    if recorded not in (None, grid):
        raise InputError(f"{source}: its metadata records a {_grid_text(recorded)} grid, the input size given a "
                         f"{_grid_text(grid)} one")
    return {**metadata, GRID_METADATA_KEY: _grid_text(grid)}


def _metadata_grid(metadata: dict[str, str], source: str) -> tuple[int, int] | None:
    text = metadata.get(GRID_METADATA_KEY)
    if text is None:
        return None
    found = re.fullmatch(r"([1-9]\d*)x([1-9]\d*)", text)
    if not found:
        raise InputError(f"{source}: metadata {GRID_METADATA_KEY}={text!r} is not HxW, e.g. 64x48")
    return int(found.group(1)), int(found.group(2))


def _grid_text(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"


def _abbreviate(keys: list[str], most: int = 8) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f", ... (+{len(keys) - most} more)" if len(keys) > most else "")


OUR_RUN = "the run that wrote it diverged; use an earlier checkpoint or train again with a lower lr"
FROM_ELSEWHERE = "the file is damaged, or the run that wrote it diverged; compare it with the original"


def refuse_non_finite(state: dict[str, torch.Tensor], source, why: str = OUR_RUN) -> None:
    """A model whose weights hold NaN or infinity (a diverged run's) predicts nothing: refused, naming a tensor."""
    bad = next((name for name, tensor in state.items()
                if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all()), None)
    if bad is not None:
        raise CheckpointError(f"{source}: weight {bad!r} is not finite (NaN or infinity): {why}")
