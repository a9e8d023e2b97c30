"""JSON from a file the user gave: text that is not JSON, or that nests too deep for Python's parser,
is one line naming the file."""
from __future__ import annotations

import json

from medsapiens.errors import InputError


def parse(raw: str | bytes, where) -> object:
    try:
        return json.loads(raw)
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deep to read") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{where}: not valid JSON ({exc})") from None
