"""Few-shot subsets: K training images drawn by seed, written as a small shard set of their own.

The draw depends only on the sorted sample keys of the train split, K and the seed, never on
shard order, so the same (K, seed) always means the same images. The subset's manifest keeps the
original val/test shards (by absolute URL), so validation and evaluation see the full splits.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medsapiens.errors import InputError
from medsapiens.io import manifest as manifestlib
from medsapiens.io.shard_tar import file_digest, read_shard, write_samples


def draw_keys(keys: list[str], shots: int, seed: int) -> list[str]:
    ordered = sorted(keys)
    if shots > len(ordered):
        raise InputError(f"{shots}-shot asks for more images than the train split has ({len(ordered)})")
    picked = np.random.default_rng(seed).choice(len(ordered), size=shots, replace=False)
    return [ordered[i] for i in sorted(picked)]


def train_samples(manifest: manifestlib.Manifest, dataset: str, split: str = "train"):
    for shard in manifest.shards_for(dataset, split):
        yield from read_shard(manifest, shard)


def few_shot_manifest(manifest: manifestlib.Manifest, dataset: str, shots: int, seed: int,
                      out_dir: Path, split: str = "train") -> manifestlib.Manifest:
    """Write `out_dir/manifest.json` (+ one shard of `split`, the training split) for a K-shot subset and load it."""
    keys = draw_keys([s["__key__"] for s in train_samples(manifest, dataset, split)], shots, seed)
    chosen = set(keys)
    picked = {s["__key__"]: s for s in train_samples(manifest, dataset, split) if s["__key__"] in chosen}
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_path = out_dir / f"{dataset}-{split}-000000.tar"
    write_samples(shard_path, (picked[k] for k in keys))
    sha256, size = file_digest(shard_path)
    info = manifest.datasets[dataset]
    splits = {name: n for name, n in info.splits.items() if name != split} | {split: shots}
    kept = [manifestlib.ShardInfo(manifest.url_of(s), s.dataset, s.split, s.samples, s.bytes, s.sha256)
            for s in manifest.shards if s.dataset == dataset and s.split != split]
    subset = manifestlib.Manifest(
        datasets={dataset: manifestlib.DatasetInfo(info.landmark_set, splits, info.source)},
        shards=[manifestlib.ShardInfo(shard_path.name, dataset, split, shots, size, sha256), *kept],
        inputs=sum(splits.values()), rejected=0,
        build={"max_side": manifest.max_side, "few_shot": {"from": manifest.location, "from_sha256": manifest.digest, "shots": shots,
                            "seed": seed, "keys": keys}},
    )
    (out_dir / manifestlib.MANIFEST_NAME).write_bytes(subset.to_json())
    (out_dir / "subset.json").write_text(json.dumps({"shots": shots, "seed": seed, "keys": keys}, indent=2))
    return manifestlib.load(out_dir)
