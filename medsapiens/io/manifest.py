"""The shard-set manifest: the contract between `shards` (writer) and the trainers (readers).

`manifest.json` sits beside the shards. Shard URLs in it are relative to the manifest's own
location, so a shard directory can be moved or uploaded to S3 as a whole. Trainers take dataset
ids, K, landmark names and mixture sizes from here, never from code.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medsapiens.errors import InputError, UserError
from medsapiens.io import jsondoc, storage
from medsapiens.io.record import MAX_IMAGE_SIDE, is_whole
from medsapiens.io.registry import LandmarkSet

FORMAT = "medsapiens-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.jsonl"
COUNTS_BY_SPLIT = ("rejected_by_split", "no_spacing_by_split")  # what a build counts per split in a dataset's source


class ManifestError(UserError, ValueError):
    pass


class NoManifest(ManifestError):
    """No manifest where one was named: a wrong path, not shards that fail a check."""


@dataclass
class ShardInfo:
    url: str
    dataset: str
    split: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class DatasetInfo:
    landmark_set: LandmarkSet
    splits: dict[str, int]
    source: dict = field(default_factory=dict)


@dataclass
class Manifest:
    datasets: dict[str, DatasetInfo]
    shards: list[ShardInfo]
    inputs: int
    rejected: int
    build: dict = field(default_factory=dict)
    location: str = ""
    digest: str = ""

    def url_of(self, shard: ShardInfo) -> str:
        """Absolute URL of a shard (relative URLs resolve against the manifest's directory)."""
        if storage.is_s3(shard.url) or shard.url.startswith("/"):
            return shard.url
        return storage.join(self.location, shard.url)

    def shards_for(self, dataset: str, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.dataset == dataset and s.split == split]

    def landmark_set(self, dataset: str) -> LandmarkSet:
        try:
            return self.datasets[dataset].landmark_set
        except KeyError:
            raise ManifestError(
                f"dataset {dataset!r} is not in the manifest at {self.location or '?'}; "
                f"it has: {', '.join(sorted(self.datasets)) or 'none'}"
            ) from None

    def split_count(self, dataset: str, key: str, split: str) -> int:
        """A count of COUNTS_BY_SPLIT for one split of a dataset: 0 where the build recorded none."""
        return self.datasets[dataset].source.get(key, {}).get(split, 0)

    @property
    def max_side(self) -> int:
        """The longest image side the build wrote (readers refuse larger images before decoding)."""
        side = self.build.get("max_side")
        return side if isinstance(side, int) and 0 < side <= MAX_IMAGE_SIDE else MAX_IMAGE_SIDE

    @property
    def written(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "datasets": {
                name: {
                    "num_landmarks": info.landmark_set.num_landmarks,
                    "names": list(info.landmark_set.names),
                    "landmark_set": info.landmark_set.to_dict(),
                    "splits": dict(sorted(info.splits.items())),
                    "source": info.source,
                }
                for name, info in sorted(self.datasets.items())
            },
            "shards": [vars(s) for s in self.shards],
            "totals": {"inputs": self.inputs, "written": self.written, "rejected": self.rejected},
            "rejected": {"count": self.rejected, "report": REJECTED_NAME},
            "build": self.build,
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode()

    @classmethod
    def from_dict(cls, d: dict, location: str = "", digest: str = "") -> "Manifest":
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ManifestError(
                f"{location or 'manifest'}: not a {FORMAT} v{VERSION} manifest "
                f"(format={d.get('format')!r}, version={d.get('version')!r})"
            )
        try:
            datasets = {
                name: DatasetInfo(LandmarkSet.from_dict(v["landmark_set"]), dict(v["splits"]), v.get("source", {}))
                for name, v in d["datasets"].items()
            }
            shards = [ShardInfo(**s) for s in d["shards"]]
            manifest = cls(datasets, shards, d["totals"]["inputs"], d["rejected"]["count"], d.get("build", {}),
                           location, digest)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{location or 'manifest'}: malformed manifest ({type(exc).__name__}: {exc})") from None
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Internal consistency: each shard listed once, split counts match the shards, K matches the names."""
        where = self.location or "manifest"
        _check_types(self, where)
        twice = sorted(url for url, n in Counter(shard.url for shard in self.shards).items() if n > 1)
        if twice:
            raise ManifestError(f"{where}: shard(s) listed more than once: {', '.join(twice[:5])}")
        for shard in self.shards:
            if shard.dataset not in self.datasets:
                raise ManifestError(f"{where}: shard {shard.url} names unknown dataset {shard.dataset!r}")
        for name, info in self.datasets.items():
            if info.landmark_set.id != name:
                raise ManifestError(f"{where}: dataset {name!r} carries landmark set {info.landmark_set.id!r}")
            for split, count in info.splits.items():
                in_shards = sum(s.samples for s in self.shards_for(name, split))
                if in_shards != count:
                    raise ManifestError(
                        f"{where}: dataset {name!r} split {split!r} claims {count} samples, its shards hold {in_shards}"
                    )
        if self.inputs != self.written + self.rejected:
            raise ManifestError(
                f"{where}: inputs {self.inputs} != written {self.written} + rejected {self.rejected}"
            )


def is_count(value) -> bool:
    return is_whole(value) and value >= 0


def _check_types(manifest: Manifest, where: str) -> None:
    for shard in manifest.shards:
        if not (all(isinstance(v, str) for v in (shard.url, shard.dataset, shard.split, shard.sha256))
                and is_count(shard.samples) and is_count(shard.bytes)):
            raise ManifestError(f"{where}: shard entry {vars(shard)!r:.200}: url, dataset, split and sha256 must be "
                                "strings, samples and bytes whole numbers of at least 0")
    for name, info in manifest.datasets.items():
        if not all(isinstance(split, str) and is_count(n) for split, n in info.splits.items()):
            raise ManifestError(f"{where}: dataset {name!r}: splits must map split names to sample counts, "
                                f"got {info.splits!r:.200}")
        if not isinstance(info.source, dict):
            raise ManifestError(f"{where}: dataset {name!r}: source must be an object")
        for key in COUNTS_BY_SPLIT:
            counts = info.source.get(key, {})
            if not (isinstance(counts, dict) and all(isinstance(s, str) and is_count(n) for s, n in counts.items())):
                raise ManifestError(f"{where}: dataset {name!r}: source.{key} must map split names to image counts, "
                                    f"got {counts!r:.200}")
    if not (is_count(manifest.inputs) and is_count(manifest.rejected)) or not isinstance(manifest.build, dict):
        raise ManifestError(f"{where}: totals.inputs and rejected.count must be sample counts, build an object")


def check_scorable(manifest: Manifest, dataset: str, split: str) -> None:
    """Refuse, before any image is predicted, a split whose dataset is scored in mm but holds images the
    build found no pixel spacing for: scoring would stop at the first of them."""
    missing = manifest.split_count(dataset, "no_spacing_by_split", split)
    if missing:
        raise ManifestError(f"{manifest.location}: {missing} of the {manifest.datasets[dataset].splits.get(split, 0)} "
                            f"{split!r} images of dataset {dataset!r} have no pixel spacing, and its errors are "
                            "measured in mm: they cannot be scored. Rebuild the shards with each image's spacing "
                            "(where a layout takes it from: docs/shards.md)")


def manifest_url(location: str | Path) -> str:
    """Accept a shard directory (local or s3://) or the manifest file itself."""
    storage.check_location(location)
    location = str(location)
    return location if location.endswith(".json") else storage.join(location, MANIFEST_NAME)


def load(location: str | Path) -> Manifest:
    url = manifest_url(location)
    try:
        raw = storage.read_bytes(url, jsondoc.MAX_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        raise NoManifest(f"no manifest at {url} (build shards with `medsapiens shards build`)") from None
    try:
        data = jsondoc.parse(raw, url)
    except InputError as exc:
        raise ManifestError(str(exc)) from None
    if not isinstance(data, dict):
        raise ManifestError(f"{url}: not a {FORMAT} manifest (a JSON object)")
    # Absolute, so shard URLs stay valid when written elsewhere (e.g. into a few-shot subset).
    base = url.rsplit("/", 1)[0] if storage.is_s3(url) else str(Path(url).resolve().parent)
    return Manifest.from_dict(data, location=base, digest=hashlib.sha256(raw).hexdigest())
