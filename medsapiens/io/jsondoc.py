"""JSON from a file the user gave: text that is not JSON, or that nests too deep for Python's parser,
is one line naming the file."""
from __future__ import annotations

import json
from pathlib import Path

from medsapiens.errors import InputError


def read(path: str | Path, where) -> object:
    """The JSON document in a file; one that cannot be read (a folder, no permission) is one line too. A
    missing file raises FileNotFoundError, for the caller to say what it expected there."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise InputError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    return parse(raw, where)


def parse(raw: str | bytes, where) -> object:
    try:
        return json.loads(raw)
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deep to read") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{where}: not valid JSON ({exc})") from None
