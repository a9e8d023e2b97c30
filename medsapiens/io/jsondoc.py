"""JSON from a file the user gave: text that is not JSON, that nests too deep for Python's parser, or
that is too large to parse, is one line naming the file."""
from __future__ import annotations

import json
import math
from pathlib import Path

from medsapiens.errors import InputError
from medsapiens.io import storage

# Parsing takes 10-25 times a file's size in memory. Landmark annotations, manifests, reports and
# bundle configs stay far below this (COCO's whole person-keypoint training set is 230 MB).
MAX_BYTES = 256 << 20


def read(path: str | Path, where) -> object:
    """The JSON document in a file; one that cannot be read (a folder, no permission) is one line too. A
    missing file raises FileNotFoundError, for the caller to say what it expected there."""
    try:
        raw = storage.read_bytes(str(path), MAX_BYTES)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise InputError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    return parse(raw, where)


def check_size(size: int, where) -> None:
    if size > MAX_BYTES:
        raise InputError(f"{where}: more than {MAX_BYTES >> 20} MiB, more than any annotation, manifest, report or "
                         "config file needs; refused before parsing (which would take 10-25 times that in memory)")


def parse(raw: str | bytes, where) -> object:
    check_size(len(raw), where)
    try:
        return json.loads(raw)
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deep to read") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{where}: not valid JSON ({exc})") from None


def dumps(value, indent: int | None = 2) -> str:
    """Standard JSON, which has no NaN: a NaN (an image left out, a landmark never visible) is written as
    null, so that strict readers (JavaScript's JSON.parse, jq) take the file."""
    return json.dumps(nan_to_null(value), indent=indent, allow_nan=False)


def nan_to_null(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: nan_to_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_null(item) for item in value]
    return value
