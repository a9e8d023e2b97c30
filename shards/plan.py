"""Planning a build: sources -> enumerated, de-duplicated inputs -> shard tasks with fingerprints.

Everything here is cheap (annotations, file stats); pixels are left to the writer's workers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medsapiens import registry
from medsapiens.record import sample_key
from medsapiens.registry import LandmarkSet
from shards import readers
from shards.readers import RawSample, ReaderError, Rejected

NAME_PATTERN = re.compile(r"^[A-Za-z0-9-]+$")


class PlanError(ValueError):
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
        raise PlanError(f"dataset {spec.dataset!r} is not built in ({', '.join(registry.BUILTIN)}); "
                        f"name its reader: {spec.dataset}:coco=PATH (readers: {', '.join(readers.READERS)})")
    root = Path(spec.path).expanduser().resolve()
    if not root.exists():
        raise PlanError(f"--source {spec.dataset}: no such file or directory {root}")
    try:
        reader = readers.load(name)
        options = readers.resolve_options(reader, spec.options)
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
        if len(names) != source.landmark_set.num_landmarks:
            raise PlanError(f"--source {source.spec.dataset}: the data names {len(names)} keypoints, the registry's "
                            f"{source.spec.dataset!r} has {source.landmark_set.num_landmarks}")
        return source.landmark_set
    unit = "mm" if samples and all(s.spacing_mm for s in samples) else "px"
    return registry.custom(source.spec.dataset, names, pairs, unit=unit)


def rejection_entry(dataset: str, source: str, source_id: str, reason: str, detail: str) -> dict:
    """One line of rejected.jsonl."""
    return {"source": source, "dataset": dataset, "id": source_id, "reason": reason, "detail": detail}


@dataclass
class Scan:
    """What enumerating the sources found: usable inputs per dataset and the rejected ones."""

    samples: dict[str, list[RawSample]] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)

    @property
    def inputs(self) -> int:
        return sum(map(len, self.samples.values())) + len(self.rejected)


def scan_source(source: Source, scan: Scan) -> None:
    """Enumerate one source into `scan`: missing images and duplicate ids become rejections."""
    dataset, kept = source.spec.dataset, []
    seen_ids: dict[str, RawSample] = {}
    seen_keys: dict[str, RawSample] = {}
    reader = readers.load(source.reader_name)

    def reject(where: str, source_id: str, reason: str, detail: str) -> None:
        scan.rejected.append(rejection_entry(dataset, where, source_id, reason, detail))

    try:
        items = list(reader.scan(source.root, source.options))
    except ReaderError as exc:
        raise PlanError(f"--source {dataset}: {exc}") from None
    for item in items:
        if isinstance(item, Rejected):
            reject(item.source, item.source_id, item.reason, item.detail)
            continue
        if not NAME_PATTERN.match(item.split):
            raise PlanError(f"--source {dataset}: split name {item.split!r} (of {item.source_id}) may hold only "
                            "letters, digits and '-'")
        key = sample_key(dataset, item.split, item.source_id)
        first = seen_ids.get(item.source_id) or seen_keys.get(key)
        if first is not None:
            reject(item.image, item.source_id, "duplicate_id",
                   f"id {item.source_id!r} ({item.split}) collides with id {first.source_id!r} ({first.split}) "
                   f"from {first.image}; the first is kept")
            continue
        seen_ids[item.source_id], seen_keys[key] = item, item
        if not Path(item.image).is_file():
            reject(item.image, item.source_id, "missing_image", f"no image file {item.image}")
            continue
        kept.append(item)
    if not items:
        raise PlanError(f"--source {dataset}: reader {source.reader_name!r} found no inputs in {source.root}")
    scan.samples[dataset] = kept
    if reader.LANDMARK_SET is None:
        source.landmark_set = data_landmark_set(source, kept)


def canonical_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def input_fingerprint(sample: RawSample) -> dict:
    """The sample as planned plus its image file's size and mtime, so an edited image is noticed."""
    stat = os.stat(sample.image)
    return {**dataclasses.asdict(sample), "image_bytes": stat.st_size, "image_mtime_ns": stat.st_mtime_ns}


def spacing_sources(samples: list[RawSample]) -> dict[str, int]:
    return dict(sorted(Counter(s.spacing_from for s in samples).items()))
