"""`medsapiens shards verify`: re-read every shard and check it against the manifest.

Each shard is streamed once (local file or S3 object): its byte count and sha256 must match the
manifest, its members must pair up as `<key>.png` + `<key>.json`, and every record must validate
against its image, its shard's dataset and split, and the manifest's landmark names.
"""
from __future__ import annotations

import hashlib
import json
import tarfile

from medsapiens import storage
from medsapiens.manifest import Manifest, ShardInfo
from medsapiens.record import Rejection, sample_key, validate_record
from medsapiens import imageio as images


class HashingReader:
    """A read-only stream wrapper that counts and hashes every byte read through it."""

    def __init__(self, stream):
        self.stream, self.sha256, self.bytes = stream, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def tar_samples(fileobj):
    """(key, {extension: bytes}) for consecutive members sharing a key, as WebDataset groups them."""
    key, sample = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, _, extension = member.name.partition(".")
            if member_key != key and sample:
                yield key, sample
                sample = {}
            key = member_key
            sample[extension] = tar.extractfile(member).read()
    if sample:
        yield key, sample


def sample_problems(manifest: Manifest, shard: ShardInfo, key: str, sample: dict) -> list[str]:
    where = f"{shard.url}: sample {key}"
    if set(sample) != {"png", "json"}:
        return [f"{where}: members {sorted(sample)}, expected png and json"]
    try:
        meta = json.loads(sample["json"])
        size = images.size_of(images.decode_png(sample["png"]))
        validate_record(meta, size, manifest.landmark_set(shard.dataset).num_landmarks)
    except (ValueError, OSError, Rejection) as exc:
        return [f"{where}: {exc}"]
    problems = []
    if (meta["dataset"], meta["split"]) != (shard.dataset, shard.split):
        problems.append(f"{where}: record says {meta['dataset']}/{meta['split']}, shard is {shard.dataset}/{shard.split}")
    if sample_key(meta["dataset"], meta["split"], meta["source_id"]) != key:
        problems.append(f"{where}: key does not match the record's dataset, split and source_id")
    if list(meta["names"]) != list(manifest.landmark_set(shard.dataset).names):
        problems.append(f"{where}: landmark names differ from the manifest's")
    return problems


def shard_problems(manifest: Manifest, shard: ShardInfo, seen: set[str]) -> list[str]:
    url = manifest.url_of(shard)
    try:
        reader = HashingReader(storage.open_stream(url))
    except FileNotFoundError:
        return [f"{url}: missing"]
    problems, count = [], 0
    try:
        for key, sample in tar_samples(reader):
            count += 1
            if key in seen:
                problems.append(f"{url}: sample {key} appears twice in the shard set")
            seen.add(key)
            problems += sample_problems(manifest, shard, key, sample)
        reader.drain()
    except tarfile.TarError as exc:
        return problems + [f"{url}: not a readable tar ({exc})"]
    expected = (shard.samples, shard.bytes, shard.sha256)
    found = (count, reader.bytes, reader.sha256.hexdigest())
    for what, want, got in zip(("samples", "bytes", "sha256"), expected, found):
        if want != got:
            problems.append(f"{url}: {what} {got}, the manifest says {want}")
    return problems


def verify(manifest: Manifest) -> tuple[list[str], int]:
    """(problems, samples checked) for every shard of the manifest."""
    problems, seen = [], set()
    for shard in manifest.shards:
        problems += shard_problems(manifest, shard, seen)
    return problems, len(seen)
