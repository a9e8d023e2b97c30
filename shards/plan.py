"""Planning a build: sources -> enumerated, de-duplicated inputs -> shard tasks with fingerprints.

Everything here is cheap (annotations, file stats); pixels are left to the writer's workers.
Shared by every reader: a registry set's native spacing where the source gives none, and a val
split carved from train where the source has none (docs/splits.md).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsapiens.errors import UserError
from medsapiens.io import registry
from medsapiens.io.record import sample_key
from medsapiens.io.registry import LandmarkSet
from medsapiens.shards import readers
from medsapiens.shards.readers import RawSample, ReaderError, Rejected, Unlabelled

NAME_PATTERN = re.compile(r"^[A-Za-z0-9-]+$")


class PlanError(UserError, ValueError):
    """The build cannot start: bad source, option or layout. The message says what to fix."""


@dataclass(frozen=True)
class SourceSpec:
    """One `--source ID[:READER]=PATH` with its `--opt ID.KEY=VALUE` options."""

    dataset: str
    path: str
    reader: str | None = None
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "SourceSpec":
        name, sep, path = text.partition("=")
        dataset, _, reader = name.partition(":")
        if not sep or not dataset or not path:
            raise PlanError(f"--source {text!r}: expected ID=PATH or ID:READER=PATH")
        return cls(dataset, path, reader or None)


def parse_option(text: str) -> tuple[str, str, str]:
    """`ID.KEY=VALUE` -> (ID, KEY, VALUE)."""
    name, sep, value = text.partition("=")
    dataset, dot, key = name.partition(".")
    if not sep or not dot or not dataset or not key:
        raise PlanError(f"--opt {text!r}: expected ID.KEY=VALUE, e.g. hand.split=gu2net")
    return dataset, key, value


def attach_options(specs: list[SourceSpec], option_texts: list[str]) -> list[SourceSpec]:
    by_id = {s.dataset: dict(s.options) for s in specs}
    for text in option_texts:
        dataset, key, value = parse_option(text)
        if dataset not in by_id:
            raise PlanError(f"--opt {text!r} names dataset {dataset!r}, which no --source builds "
                            f"({', '.join(by_id) or 'none'})")
        by_id[dataset][key] = value
    return [dataclasses.replace(s, options=by_id[s.dataset]) for s in specs]


@dataclass
class Source:
    """A source opened for reading: its reader, resolved options and landmark set."""

    spec: SourceSpec
    reader_name: str
    root: Path
    options: dict
    landmark_set: LandmarkSet | None  # None until scanned, for sets the data defines

    def describe(self) -> dict:
        reader = readers.load(self.reader_name)
        return {"reader": self.reader_name, "path": str(self.root), "options": self.options,
                "split_rule": reader.SPLIT_RULE}


def open_source(spec: SourceSpec) -> Source:
    if not NAME_PATTERN.match(spec.dataset):
        raise PlanError(f"dataset id {spec.dataset!r} may hold only letters, digits and '-'")
    name = spec.reader or readers.NATIVE_READER.get(spec.dataset)
    if name is None:
        close = difflib.get_close_matches(spec.dataset, list(registry.BUILTIN), n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise PlanError(f"dataset {spec.dataset!r} is not built in ({', '.join(registry.BUILTIN)}); {guess}"
                        f"for your own data name its reader: {spec.dataset}:coco=PATH "
                        f"(readers: {', '.join(readers.READERS)})")
    root = Path(spec.path).expanduser().resolve()
    if not root.exists():
        raise PlanError(f"--source {spec.dataset}: no such file or directory {root}")
    try:
        reader = readers.load(name)
        options = readers.resolve_options(reader, spec.options)
        carve_settings(options)
    except ReaderError as exc:
        raise PlanError(f"--source {spec.dataset}: {exc}") from None
    return Source(spec, name, root, options, native_landmark_set(spec.dataset, reader))


def native_landmark_set(dataset: str, reader) -> LandmarkSet | None:
    """The registry's set for this dataset id, checked against what the reader reads."""
    if reader.LANDMARK_SET is None:
        return registry.BUILTIN.get(dataset)
    if dataset in registry.BUILTIN and dataset != reader.LANDMARK_SET:
        raise PlanError(f"dataset {dataset!r} is the registry's {registry.get(dataset).num_landmarks}-landmark set, "
                        f"but reader {reader.__name__.rsplit('.', 1)[-1]!r} reads {reader.LANDMARK_SET!r} landmarks")
    return dataclasses.replace(registry.get(reader.LANDMARK_SET), id=dataset)


def data_landmark_set(source: Source, samples: list[RawSample]) -> LandmarkSet:
    """A set the data defines (COCO categories): px unless every sample has a spacing."""
    names, pairs = readers.load(source.reader_name).landmark_names(source.root, source.options)
    if source.landmark_set is not None:
        check_registry_order(source.spec.dataset, source.landmark_set, names, pairs)
        return source.landmark_set
    unit = "mm" if samples and all(s.spacing_mm for s in samples) else "px"
    return registry.custom(source.spec.dataset, names, pairs, unit=unit)


def check_registry_order(dataset: str, landmark_set: LandmarkSet, names: tuple, pairs: tuple | None) -> None:
    """Data read as a registry set gives its keypoints in the registry's order (MedSapiens' COCO files
    name them K0, K1, ...); names that are the registry's in another order, or flip pairs other than
    the registry's, would score and flip the wrong landmarks, so they are refused."""
    where = f"--source {dataset}: the data"
    if len(names) != landmark_set.num_landmarks:
        raise PlanError(f"{where} names {len(names)} keypoints, the registry's {dataset!r} has "
                        f"{landmark_set.num_landmarks}")
    misplaced = registry.misplaced_name(names, landmark_set.names)
    if misplaced:
        i, j = misplaced
        raise PlanError(f"{where} lists the registry's {dataset!r} keypoints in another order (keypoint {i} is "
                        f"{names[i]!r}, the registry's keypoint {j}): reorder the file, or build it under another "
                        "dataset id to keep its own order")
    if pairs is not None and {frozenset(p) for p in pairs} != {frozenset(p) for p in landmark_set.flip_pairs or ()}:
        raise PlanError(f"{where} gives flip_pairs other than the registry's {dataset!r} pairs: the registry's "
                        "order and pairs are what is read, so drop flip_pairs from the file, or build it under "
                        "another dataset id")


def rejection_entry(dataset: str, source: str, source_id: str, reason: str, detail: str,
                    split: str | None = None) -> dict:
    """One line of rejected.jsonl; with the split the input would have been in, where that is known."""
    return {"source": source, "dataset": dataset, "id": source_id, "reason": reason, "detail": detail,
            **({"split": split} if split else {})}


@dataclass
class Scan:
    """What enumerating the sources found: usable inputs per dataset and the rejected ones; per
    dataset how its val split was obtained and how many files were not inputs (Unlabelled)."""

    samples: dict[str, list[RawSample]] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)
    validation: dict[str, dict] = field(default_factory=dict)
    test: dict[str, dict] = field(default_factory=dict)  # test splits carved from train (test_fraction)
    unlabelled: dict[str, int] = field(default_factory=dict)

    @property
    def inputs(self) -> int:
        return sum(map(len, self.samples.values())) + len(self.rejected)


def checked_inputs(dataset: str, items: list, rejected: list[dict]) -> list[RawSample]:
    """The reader's samples less its rejections, missing images and duplicate ids (the first is
    kept); every one left out is appended to `rejected`."""
    kept = []
    seen_ids: dict[str, RawSample] = {}
    seen_keys: dict[str, RawSample] = {}

    def reject(where: str, source_id: str, reason: str, detail: str, split: str | None = None) -> None:
        rejected.append(rejection_entry(dataset, where, source_id, reason, detail, split))

    for item in items:
        if isinstance(item, Rejected):
            reject(item.source, item.source_id, item.reason, item.detail, item.split)
            continue
        if not NAME_PATTERN.match(item.split):
            raise PlanError(f"--source {dataset}: split name {item.split!r} (of {item.source_id}) may hold only "
                            "letters, digits and '-'")
        key = sample_key(dataset, item.split, item.source_id)
        first = seen_ids.get(item.source_id) or seen_keys.get(key)
        if first is not None:
            reject(item.image, item.source_id, "duplicate_id",
                   f"id {item.source_id!r} ({item.split}) collides with id {first.source_id!r} ({first.split}) "
                   f"from {first.image}; the first is kept", item.split)
            continue
        seen_ids[item.source_id], seen_keys[key] = item, item
        if not Path(item.image).is_file():
            reject(item.image, item.source_id, "missing_image", f"no image file {item.image}", item.split)
            continue
        kept.append(item)
    return kept


def with_native_spacing(dataset: str, samples: list[RawSample]) -> list[RawSample]:
    """A registry set with a fixed spacing (head: 0.1 mm/px) lends it to samples whose source gives none."""
    spacing = registry.BUILTIN[dataset].native_spacing_mm if dataset in registry.BUILTIN else None
    if spacing is None:
        return samples
    label = f"registry {dataset!r} native {spacing:g} mm/px"
    return [s if s.spacing_mm else dataclasses.replace(s, spacing_mm=(spacing, spacing), spacing_from=label)
            for s in samples]


def carve_settings(options: dict, split: str = "val") -> tuple[float, int]:
    """(<split>_fraction, <split>_seed) of a carve from train, checked."""
    fraction, seed = readers.number(options, f"{split}_fraction"), readers.number(options, f"{split}_seed", int)
    if not 0 < fraction < 1:
        raise ReaderError(f"option {split}_fraction={options[f'{split}_fraction']!r} must lie between 0 and 1")
    if seed < 0:
        raise ReaderError(f"option {split}_seed={options[f'{split}_seed']!r} must be a non-negative integer")
    return fraction, seed


def carve_count(n: int, fraction: float) -> int:
    """How many of n train samples become val: round(n * fraction), at least 1 and at most n - 1 (n >= 2)."""
    return min(max(round(n * fraction), 1), n - 1) if n >= 2 else 0


def carve(samples: list[RawSample], split: str, fraction: float, seed: int) -> tuple[list[RawSample], dict]:
    """A split from train: the train ids in natural order, shuffled by numpy default_rng(seed); the
    first carve_count of them move to `split`. Returns the samples and the manifest's record."""
    train = sorted((s.source_id for s in samples if s.split == "train"), key=readers.natural_key)
    order = np.random.default_rng(seed).permutation(len(train))
    chosen = {train[i] for i in order[:carve_count(len(train), fraction)]}
    carved = [dataclasses.replace(s, split=split) if s.split == "train" and s.source_id in chosen else s
              for s in samples]
    return carved, {"rule": "carved from train", "fraction": fraction, "seed": seed,
                    "ids": sorted(chosen, key=readers.natural_key)}


def carve_validation(samples: list[RawSample], options: dict) -> tuple[list[RawSample], dict]:
    return carve(samples, "val", *carve_settings(options))


def with_validation(source: Source, samples: list[RawSample]) -> tuple[list[RawSample], dict]:
    """The source's own val split where it has one (its rule recorded), else one carved from train."""
    if any(s.split == "val" for s in samples):
        return samples, {"rule": readers.validation_rule(readers.load(source.reader_name), source.options)}
    return carve_validation(samples, source.options)


def with_test(source: Source, samples: list[RawSample]) -> tuple[list[RawSample], dict | None]:
    """With the `test_fraction` option (COCO and DICOM sources): a seeded test split carved from train,
    for a source that has none; its record for the manifest (None without the option)."""
    options, dataset = source.options, source.spec.dataset
    if not getattr(readers.load(source.reader_name), "CARVES_TEST", False):
        return samples, None
    try:
        if readers.number(options, "test_fraction") == 0:
            return samples, None
        fraction, seed = carve_settings(options, "test")
    except ReaderError as exc:
        raise PlanError(f"--source {dataset}: {exc}") from None
    present = sorted({s.split for s in samples if s.split.startswith("test")})
    if present:
        raise PlanError(f"--source {dataset}: test_fraction carves a test split from train, but the source has "
                        f"{', '.join(present)} already; drop one of them")
    return carve(samples, "test", fraction, seed)


def nothing_usable(source: Source, inputs: int, rejected: list[dict]) -> str:
    """The error for a source none of whose inputs can be used: the reasons, and the layout its reader reads."""
    reasons = Counter(r["reason"] for r in rejected)
    counts = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    example = f" (e.g. {rejected[0]['detail']})" if rejected else ""
    return (f"--source {source.spec.dataset}: none of the {inputs} input(s) found in {source.root} can be used: "
            f"{counts}{example}. Reader {source.reader_name!r} reads the layout: "
            f"{readers.layout(readers.load(source.reader_name))}")


def scan_source(source: Source, scan: Scan) -> None:
    """Enumerate one source into `scan` (see checked_inputs), then give it the registry's native
    spacing where needed and a val split where it has none."""
    dataset = source.spec.dataset
    reader = readers.load(source.reader_name)
    try:
        items = list(reader.scan(source.root, source.options))
    except ReaderError as exc:
        raise PlanError(f"--source {dataset}: {exc}") from None
    inputs = [i for i in items if not isinstance(i, Unlabelled)]
    if not inputs:
        unlabelled = f" ({len(items)} unlabelled file(s))" if items else ""
        raise PlanError(f"--source {dataset}: reader {source.reader_name!r} found no inputs in {source.root}"
                        f"{unlabelled}")
    kept = with_native_spacing(dataset, checked_inputs(dataset, inputs, scan.rejected))
    if reader.LANDMARK_SET is None:
        source.landmark_set = data_landmark_set(source, kept)
    if not kept:
        raise PlanError(nothing_usable(source, len(inputs), [r for r in scan.rejected if r["dataset"] == dataset]))
    kept, test = with_test(source, kept)
    if test:
        scan.test[dataset] = test
    scan.samples[dataset], scan.validation[dataset] = with_validation(source, kept)
    scan.unlabelled[dataset] = len(items) - len(inputs)


def canonical_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def input_fingerprint(sample: RawSample) -> dict:
    """The sample as planned plus its image file's size and mtime, so an edited image is noticed."""
    stat = os.stat(sample.image)
    return {**dataclasses.asdict(sample), "image_bytes": stat.st_size, "image_mtime_ns": stat.st_mtime_ns}


def spacing_sources(samples: list[RawSample]) -> dict[str, int]:
    return dict(sorted(Counter(s.spacing_from for s in samples).items()))
