"""`medsapiens shards verify`: re-read every shard and check it against the manifest.

Each shard is streamed once (local file or S3 object), as the trainers read it
(medsapiens.io.shard_tar.read_shard: uncompressed, bounded by its manifest entry): its byte count and sha256
must match the manifest, no image may exceed the build's max side, its members must pair up as
`<key>.png` + `<key>.json`, and every record must validate against its image, its shard's
dataset and split, and the manifest's landmark names, with no visible landmark outside the image.
Then what the manifest promises of the whole set: the val ids it says were carved from train,
and `rejected.jsonl` listing every rejected input with its reason. (Split counts against the
shard entries are checked when the manifest loads.)
"""
from __future__ import annotations

import json
from pathlib import Path

from medsapiens.io import imageio as images
from medsapiens.io import shard_tar, storage
from medsapiens.io.manifest import REJECTED_NAME, Manifest, ShardInfo
from medsapiens.io.record import Rejection, sample_key, validate_record


def sample_problems(manifest: Manifest, shard: ShardInfo, key: str, sample: dict) -> list[str]:
    where = f"{shard.url}: sample {key}"
    members = shard_tar.members_of(sample)
    if members != shard_tar.MEMBERS:
        return [f"{where}: members {sorted(members)}, expected {shard_tar.IMAGE} and {shard_tar.RECORD}"]
    try:
        meta = json.loads(sample[shard_tar.RECORD])
        size = images.size_of(shard_tar.decode_pixels(sample, manifest.max_side))
        inside = validate_record(meta, size, manifest.landmark_set(shard.dataset).num_landmarks)
    except (ValueError, OSError, Rejection) as exc:
        return [f"{where}: {exc}"]
    problems = []
    outside = [k for k, (said, found) in enumerate(zip(meta["visible"], inside, strict=True)) if said != found]
    if outside:
        problems.append(f"{where}: visible landmark(s) {outside} lie outside the {size[0]}x{size[1]} image")
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
    except shard_tar.MissingShard:
        return [f"{url}: missing"]
    except storage.S3Refusal as exc:  # another bucket's (a few-shot subset's shards), refused: the others still count
        return [f"{url}: unreadable ({exc})"]
    except shard_tar.ShardError as exc:
        problems.append(str(exc))
    if count != shard.samples:
        problems.append(f"{url}: samples {count}, the manifest says {shard.samples}")
    return problems


def verify(manifest: Manifest) -> tuple[list[str], int]:
    """(problems, samples checked) for every shard of the manifest, then the set as a whole."""
    problems, seen = [], set()
    for shard in manifest.shards:
        problems += shard_problems(manifest, shard, seen)
    return problems + carved_val_problems(manifest, seen) + rejected_problems(manifest), len(seen)


def unlisted_tars(manifest: Manifest) -> list[str]:
    """Tar files beside a local manifest that it does not list (an earlier, larger build's, or another's):
    no problem for training, which reads only what the manifest lists, but not part of this set."""
    if storage.is_s3(manifest.location) or not manifest.location:
        return []
    listed = {Path(manifest.url_of(shard)).resolve() for shard in manifest.shards}
    return sorted(p.name for p in Path(manifest.location).glob("*.tar") if p.resolve() not in listed)


def carved_val_problems(manifest: Manifest, keys: set[str]) -> list[str]:
    """The val samples of a dataset whose val split was carved from train are the ids the manifest lists."""
    problems = []
    for dataset, info in manifest.datasets.items():
        carved = (info.source.get("validation") or {}).get("ids")
        if carved is None:
            continue
        listed = {sample_key(dataset, "val", i) for i in carved}
        val = {k for k in keys if k.startswith(f"{dataset}_val_")}
        if listed != val:
            problems.append(f"{dataset}/val: samples {sorted(val ^ listed)[:5]} differ from the ids the manifest "
                            "says were carved from train")
    return problems


def rejected_problems(manifest: Manifest) -> list[str]:
    """`rejected.jsonl` must list as many inputs as the manifest says were rejected, each with its reason."""
    url = storage.join(manifest.location, REJECTED_NAME)
    try:
        lines = storage.read_bytes(url).decode().splitlines()
    except FileNotFoundError:
        return [f"{url}: missing"] if manifest.rejected else []
    try:
        entries = [json.loads(line) for line in lines if line.strip()]
    except ValueError as exc:
        return [f"{url}: not JSON lines ({exc})"]
    problems = [f"{url}: line {n + 1} has no reason" for n, e in enumerate(entries)
                if not isinstance(e, dict) or e.get("reason") not in Rejection.REASONS]
    if len(entries) != manifest.rejected:
        problems.append(f"{url}: lists {len(entries)} rejected input(s), the manifest says {manifest.rejected}")
    return problems
