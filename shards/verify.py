"""`medsapiens shards verify`: re-read every shard and check it against the manifest.

Each shard is streamed once (local file or S3 object), as the trainers read it
(medsapiens.shard_tar.read_shard: uncompressed, bounded by its manifest entry): its byte count and sha256
must match the manifest, no image may exceed the build's max side, its members must pair up as
`<key>.png` + `<key>.json`, and every record must validate against its image, its shard's
dataset and split, and the manifest's landmark names.
"""
from __future__ import annotations

import json

from medsapiens.manifest import Manifest, ShardInfo
from medsapiens.record import Rejection, sample_key, validate_record
from medsapiens import shard_tar
from medsapiens import imageio as images


def sample_problems(manifest: Manifest, shard: ShardInfo, key: str, sample: dict) -> list[str]:
    where = f"{shard.url}: sample {key}"
    members = shard_tar.members_of(sample)
    if members != shard_tar.MEMBERS:
        return [f"{where}: members {sorted(members)}, expected {shard_tar.IMAGE} and {shard_tar.RECORD}"]
    try:
        meta = json.loads(sample[shard_tar.RECORD])
        size = images.size_of(shard_tar.decode_pixels(sample, manifest.max_side))
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
    problems, count = [], 0
    try:
        for sample in shard_tar.read_shard(manifest, shard):
            key = sample["__key__"]
            count += 1
            if key in seen:
                problems.append(f"{url}: sample {key} appears twice in the shard set")
            seen.add(key)
            problems += sample_problems(manifest, shard, key, sample)
    except FileNotFoundError:
        return [f"{url}: missing"]
    except shard_tar.ShardError as exc:
        problems.append(str(exc))
    if count != shard.samples:
        problems.append(f"{url}: samples {count}, the manifest says {shard.samples}")
    return problems


def verify(manifest: Manifest) -> tuple[list[str], int]:
    """(problems, samples checked) for every shard of the manifest."""
    problems, seen = [], set()
    for shard in manifest.shards:
        problems += shard_problems(manifest, shard, seen)
    return problems, len(seen)
