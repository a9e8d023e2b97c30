"""One failing rank ends the job in bounded time, naming the cause: a bad validation sample read
by rank 1 alone stops both ranks in seconds, not after the distributed timeout (600 s here)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import time

import pytest

from conftest import deepspeed_module, pretrain_args


def add_bad_val_shard(shards):
    """A second head val shard (dealt to rank 1 by round-robin) whose first record has scale [0, 0]."""
    manifest = json.loads((shards / "manifest.json").read_text())
    index, entry = next((i, s) for i, s in enumerate(manifest["shards"]) if s["dataset"] == "head" and s["split"] == "val")
    with tarfile.open(shards / entry["url"]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad_key = members[0][0].name.partition(".")[0]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name == f"{bad_key}.json":
                data = json.dumps({**json.loads(data), "scale": [0, 0]}).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    (shards / "head-val-bad.tar").write_bytes(out.getvalue())
    manifest["shards"].insert(index + 1, {**entry, "url": "head-val-bad.tar", "bytes": len(out.getvalue()),
                                           "sha256": hashlib.sha256(out.getvalue()).hexdigest()})
    manifest["datasets"]["head"]["splits"]["val"] += entry["samples"]
    manifest["totals"]["inputs"] += entry["samples"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return bad_key


@pytest.mark.timeout(240)
def test_a_bad_validation_sample_on_one_rank_ends_the_job_in_seconds(phantom_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(phantom_shards, shards)
    bad_key = add_bad_val_shard(shards)
    started = time.monotonic()
    proc = deepspeed_module("pretrain", 2, pretrain_args(
        shards, tmp_path / "run", "data.datasets=[head]", "train.max_steps=2", "train.val_every=2",
        "train.checkpoint_every=2", "train.dist_timeout_s=600"), timeout=200)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert f"sample {bad_key} of {shards / 'head-val-bad.tar'}" in proc.stderr
    assert "scale must be two positive numbers" in proc.stderr
    assert elapsed < 150, f"took {elapsed:.0f} s"
