"""Torch checkpoint files from elsewhere, read without running their code.

`torch.load(weights_only=True)` first. mmengine checkpoints (Sapiens pose models, MedSapiens'
releases) also pickle objects it refuses (HistoryBuffer in `message_hub`, numpy arrays and scalars
in `meta`); those files are read by a restricted unpickler that resolves only tensor rebuilding and
plain containers and stands an inert placeholder in for every other global: nothing named in the
file is imported or called. Only a zip as torch.save writes it, its records stored, is read, and
placeholders past NAMED_PLACEHOLDERS names share one class, so what loading allocates stays
proportional to the file's size.
"""
from __future__ import annotations

import pickle
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from medsapiens.errors import InputError

WEIGHTS_ONLY = "torch.load(weights_only=True)"
SHOWN_NAMES = 20  # of the placeholders', in how a file was read
NAMED_PLACEHOLDERS = 1000  # past these, one shared class: a class costs ~2 KB, a name a few bytes of the file
TORCH_ADVICE = ("Weights only load failed", "(1)", "(2)", "Check the documentation", "Please file an issue")


def weights_only_refusal(exc: Exception) -> str:
    """What torch's weights_only reader refused, from its message (the rest of which is advice)."""
    for line in str(exc).splitlines():
        line = line.split("WeightsUnpickler error:")[-1].strip()
        if line and not line.startswith(TORCH_ADVICE):
            return line.split(" was not an allowed")[0][:200]
    return "it refused the file"


def check_torch_zip(path: str) -> None:
    """A torch file as torch.save writes it (since torch 1.6): a zip whose records are stored, not
    compressed, so that what loading allocates is bounded by the file's own size. Else one line: the
    older format and compressed records both let a small file make torch allocate any amount."""
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a readable checkpoint: neither safetensors nor a torch file as torch.save "
                         "writes it (a zip; a file from torch before 1.6 must be saved again); if it should be one, "
                         "it is cut short or damaged: compare its size or checksum with the original's")
    with zipfile.ZipFile(path) as archive:
        records = archive.infolist()
    inflated, size = sum(r.file_size for r in records), Path(path).stat().st_size
    if inflated > size or any(r.compress_type != zipfile.ZIP_STORED for r in records):
        raise InputError(f"{path}: refused: its records are compressed ({inflated:,} bytes from a file of {size:,}), "
                         "which torch.save never does; save the state dict again with torch.save or as safetensors")


def read_checkpoint(path: str | Path) -> tuple[object, str]:
    """(the unpickled object, how it was read): weights_only first, then the restricted loader. A file
    neither reads is one line naming it."""
    check_torch_zip(str(path))
    try:
        return _load(path, weights_only=True), WEIGHTS_ONLY
    except pickle.UnpicklingError as e:
        refused = weights_only_refusal(e)
    except Exception as e:  # truncated, or no torch file
        raise InputError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    placeholders: set[str] = set()
    try:
        obj = _load(path, weights_only=False, pickle_module=_restricted_pickle(placeholders))
    except Exception as e:
        raise InputError(f"{path}: not a readable checkpoint (weights_only: {refused}; the restricted loader: "
                         f"{type(e).__name__}: {e}); if it should be one, it is damaged: compare its size or "
                         "checksum with the original's") from None
    names = sorted(placeholders)
    listed = ", ".join(names[:SHOWN_NAMES]) + (", ..." if len(names) > SHOWN_NAMES else "")
    return obj, (f"the restricted loader (weights_only=True refused: {refused}); "
                 f"{len(names)} global(s) left as inert placeholders: {listed}")


def _load(path: str | Path, **kwargs):
    with open(path, "rb") as f:  # a file object: torch reads no meaning into the name's suffix
        return torch.load(f, map_location="cpu", **kwargs)


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


def _restricted_pickle(placeholders: set[str]):
    """A stand-in for the `pickle` module whose Unpickler records each unresolved global's name. The
    pure-Python unpickler: its memo is a dict, where C's is a table sized by the largest index a file
    names (a few bytes asking for gigabytes)."""
    classes: dict[str, type] = {}

    class Unpickler(pickle._Unpickler):
        def find_class(self, module, name):
            full = f"{module}.{name}"
            if full in _RESOLVED:
                return _RESOLVED[full]
            placeholders.add(full)
            if full not in classes and len(classes) < NAMED_PLACEHOLDERS:
                classes[full] = type("Placeholder", (_Inert,), {"global_name": full})
            return classes.get(full, _Inert)

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__=f"{__name__}.restricted_pickle", Unpickler=Unpickler, load=load)
