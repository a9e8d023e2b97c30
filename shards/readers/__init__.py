"""Readers: one module per native dataset layout.

A reader only enumerates: it reads annotations (and at most image headers), never decodes pixels.
It yields a `RawSample` per usable input and a `Rejected` for every input it finds broken, so
nothing is dropped silently. Image decoding, resizing and validation happen later, in the writer's
worker processes.

A reader module defines what `Reader` lists (tests/unit/test_shards_readers.py holds every reader
to it), and where they apply:
  landmark_names(root, options) -> (names, flip_pairs)   required when LANDMARK_SET is None
  validation_rule(options) -> str   how the reader's own `val` split is made (default "source split")
  CARVES_TEST   True when its test_fraction option carves a seeded test split from train
  check_options(options)   refuses bad option values (ReaderError) when the source is opened

Every source also accepts the VALIDATION_OPTIONS: where the reader yields no `val` split, the
plan carves one from `train` (shards/plan.py, docs/splits.md). A reader that has an option of
the same name (hand's `val_fraction`) sets its default.
"""
from __future__ import annotations

import importlib
import re
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol

from medsapiens.errors import InputError, UserError
from medsapiens.io import jsondoc, storage
from medsapiens.io.record import Rejection, is_number, is_point_list, is_positive_pair

READERS = ("isbi2015", "hand", "chest", "leg", "coco", "aariz", "dicom")
NATIVE_READER = {"head": "isbi2015", "hand": "hand", "chest": "chest", "leg": "leg", "aariz": "aariz"}
VALIDATION_OPTIONS = {"val_fraction": "0.1", "val_seed": "0"}
DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class RawSample:
    """One input as its dataset describes it, in original image pixels (pixel centres on integers).

    spacing_mm is (x, y) mm per original pixel or None; spacing_from says where it came from.
    expected_size (W, H) is the size the annotation claims, checked against the decoded image.
    """

    source_id: str
    split: str
    image: str
    landmarks: tuple[tuple[float, float], ...]
    visible: tuple[int, ...] | None = None
    spacing_mm: tuple[float, float] | None = None
    spacing_from: str = "none"
    expected_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class Rejected:
    """An input the reader found unusable; `source` names the file that shows it; `split`, where the
    layout tells it, is the split the input would have been in."""

    source_id: str
    source: str
    reason: str
    detail: str
    split: str | None = None


@dataclass(frozen=True)
class Unlabelled:
    """A file in the layout that is not an input of the landmark dataset (e.g. an image the
    landmark labels leave out): counted in the manifest, neither built nor rejected."""

    source_id: str
    source: str


class Reader(Protocol):
    """A reader module, seen as an object."""

    OPTIONS: dict[str, str | None]  # {name: default} of its options (`--opt ID.KEY=VALUE`); values are strings
    SPLIT_RULE: str  # how splits are assigned, one line (copied into the manifest)
    LANDMARK_SET: str | None  # the registry id whose landmarks it reads, or None when the data defines them

    def scan(self, root: Path, options: dict) -> Iterator[RawSample | Rejected | Unlabelled]: ...


class ReaderError(UserError, ValueError):
    """A problem with the reader's configuration (not with one sample): the build cannot start."""


def load(name: str) -> Reader:
    if name not in READERS:
        raise ReaderError(f"unknown reader {name!r}; readers: {', '.join(READERS)}")
    return importlib.import_module(f"medsapiens.shards.readers.{name}")


def accepted_options(reader: ModuleType) -> dict[str, str | None]:
    """The reader's OPTIONS, then the VALIDATION_OPTIONS it does not define itself: {name: default}."""
    return {**reader.OPTIONS, **{k: v for k, v in VALIDATION_OPTIONS.items() if k not in reader.OPTIONS}}


def resolve_options(reader: ModuleType, given: dict[str, str]) -> dict[str, str | None]:
    """The defaults updated with `given`; an unknown name is an error listing the valid ones."""
    name = reader.__name__.rsplit(".", 1)[-1]
    accepted = accepted_options(reader)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ReaderError(f"reader {name!r} has no option {', '.join(map(repr, unknown))}; "
                          f"valid options: {', '.join(accepted)}")
    resolved = {**accepted, **given}
    check = getattr(reader, "check_options", None)
    if check:
        check(resolved)
    return resolved


def layout(reader: ModuleType) -> str:
    """The native layout a reader reads, from the indented lines of its docstring (else its title)."""
    lines = (reader.__doc__ or "").splitlines()
    indented = [" ".join(line.split()) for line in lines if line.startswith("    ") and line.strip()]
    return "; ".join(indented) if indented else lines[0].strip() if lines else "see docs/shards.md"


def validation_rule(reader: ModuleType, options: dict) -> str:
    """How the reader's own val split is made, for the manifest."""
    rule = getattr(reader, "validation_rule", None)
    return rule(options) if rule else "source split"


def choice(options: dict, key: str, allowed: tuple[str, ...]) -> str:
    value = options[key]
    if value not in allowed:
        raise ReaderError(f"option {key}={value!r} must be one of {', '.join(allowed)}")
    return value


def number(options: dict, key: str, kind=float):
    try:
        return kind(options[key])
    except (TypeError, ValueError):
        raise ReaderError(f"option {key}={options[key]!r} is not a valid {kind.__name__}") from None


def optional_path(root: Path, options: dict, key: str, default_name: str | None = None) -> Path | None:
    """An option naming a file (relative to root), else root/default_name when that exists."""
    if options.get(key):
        path = Path(options[key])
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise ReaderError(f"option {key}: no such file {path}")
        return path
    default = root / default_name if default_name else None
    return default if default and default.is_file() else None


def first_existing(candidates) -> Path:
    """The first candidate path that exists, else the first one (the writer reports it missing)."""
    candidates = list(candidates)
    return next((c for c in candidates if c.is_file()), candidates[0])


def read_text(path: Path) -> str:
    """A UTF-8 text file (BOM allowed). Another encoding, or a file that cannot be read (a directory, no
    permission), is a ReaderError naming the file: one line for a table or list, and (being a ValueError)
    a rejection where a reader reads one input's file."""
    try:
        raw = storage.read_bytes(str(path), jsondoc.MAX_BYTES)
        jsondoc.check_size(len(raw), path)
    except OSError as exc:
        raise ReaderError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except InputError as exc:
        raise ReaderError(str(exc)) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReaderError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None


def read_json(path: Path) -> object:
    """A JSON file; text that is not UTF-8, not JSON or nested too deep is a ValueError naming the file."""
    return jsondoc.parse(read_text(path), path)


# What reading one input's annotation may raise for bad data (OverflowError: float() of a huge JSON integer).
BAD_INPUT = (Rejection, ValueError, KeyError, TypeError, OverflowError)


def rejected(source_id: str, source, exc: Exception, where=None, split: str | None = None) -> Rejected:
    """The Rejected for an input whose annotation raised `exc` (one of BAD_INPUT): a Rejection keeps its
    reason, anything else is bad_annotation. The detail starts with `where` (default: the source file)."""
    where = str(where or source)
    if isinstance(exc, Rejection):
        reason, text = exc.reason, exc.detail
    else:
        reason, text = "bad_annotation", f"no field {exc}" if isinstance(exc, KeyError) else str(exc)
    return Rejected(source_id, str(source), reason, text if text.startswith(where) else f"{where}: {text}", split)


def spacing_pair(value, what: str = "spacing", order: str = "xy") -> tuple[float, float]:
    """(x, y) mm per pixel from a file's two-number spacing written in `order` ("xy" or "yx"); anything
    else (a string such as "12", one number, zero, NaN) is a bad_spacing Rejection."""
    try:
        good = is_positive_pair(value)
    except OverflowError:  # an integer too large for a float
        good = False
    if not good:
        raise Rejection("bad_spacing", f"{what} must be two positive numbers, got {reprlib.repr(value)}")
    first, second = float(value[0]), float(value[1])
    return (first, second) if order == "xy" else (second, first)


def is_size(value) -> bool:
    """A positive whole number of pixels: an int, or a float without a fraction (never a bool or a string)."""
    return is_number(value) and value > 0 and (isinstance(value, int) or float(value).is_integer())


def point_list(value, what: str = "landmarks") -> tuple[tuple[float, float], ...]:
    """[[x, y], ...] of numbers as float pairs; anything else (a string "12" for a point) is a ValueError."""
    if not is_point_list(value):
        raise ValueError(f"{what} must be a list of [x, y] numbers, got {reprlib.repr(value)}")
    return tuple((float(x), float(y)) for x, y in value)


def natural_key(text: str) -> list:
    """Sort key comparing digit runs as numbers: 'L2' < 'L10', '9' < '10'."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text))]  # odd: digit runs


def order_split(n: int, fractions: tuple[float, ...], names: tuple[str, ...]) -> list[str]:
    """Split names for n items in order: the first round(n*f0) get names[0], the next round(n*f1)
    names[1], ..., the rest the last name."""
    out: list[str] = []
    for fraction, name in zip(fractions, names[:-1], strict=True):  # the last name takes the rest
        out += [name] * min(round(n * fraction), n - len(out))
    return out + [names[-1]] * (n - len(out))
