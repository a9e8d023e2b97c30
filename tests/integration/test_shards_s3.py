"""Shards on S3, against moto's server mode: real HTTP on 127.0.0.1, reached by the CLI in
subprocesses and by its worker processes exactly as a real endpoint would be."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import KEY_ID, REPO, SECRET
from PIL import Image

from medsapiens.shards.phantoms import write_phantoms


def noise_dataset(root: Path) -> Path:
    """Four 16-bit noise images (PNG barely compresses noise): a train shard of three (one is carved
    into val) of ~6 MB, uploaded in parts."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(4):
        Image.fromarray(rng.integers(0, 65535, (1000, 1000), dtype=np.uint16)).save(root / f"n{i}.png")
        images.append({"id": i, "file_name": f"n{i}.png"})
        annotations.append({"image_id": i, "keypoints": [10, 20, 2, 500, 600, 2]})
    (root / "noise_train_ann.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "keypoints": ["a", "b"]}]}))
    return root


def cli(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medsapiens.launch.cli", "shards", *map(str, args)], cwd=REPO,
                          env={**os.environ, **env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)


def test_build_inspect_verify_and_stream_a_shard_on_s3(s3_env, tmp_path, monkeypatch):
    env, client = s3_env
    roots = write_phantoms(tmp_path / "raw", n=4, seed=5, sets=["hand", "chest"])
    sources = [a for name, path in roots.items() for a in ("--source", f"{name}={path}")]
    sources += ["--source", f"noise:coco={noise_dataset(tmp_path / 'noise')}"]
    url = "s3://medsapiens-test/runs/shards"
    built = cli(env, "build", *sources, "--out", url, "--workers", 2, "--multipart-mb", 5)
    assert built.returncode == 0, built.stderr
    assert "inputs 12 = written 12 + rejected 0" in built.stdout

    manifest = json.loads(client.get_object(Bucket="medsapiens-test", Key="runs/shards/manifest.json")["Body"].read())
    noise = next(s for s in manifest["shards"] if s["dataset"] == "noise")
    assert noise["bytes"] > 5 * 1024 * 1024
    head = client.head_object(Bucket="medsapiens-test", Key=f"runs/shards/{noise['url']}")
    assert "-" in head["ETag"]  # a multipart upload's ETag is "<md5 of part md5s>-<parts>"
    stats = client.get_object(Bucket="medsapiens-test", Key="runs/shards/hand-train-000000.stats.json")
    assert json.loads(stats["Body"].read())["samples"] == manifest["datasets"]["hand"]["splits"]["train"]

    rerun = cli(env, "build", *sources, "--out", url, "--workers", 2, "--multipart-mb", 5)
    assert "(0 shard(s) written, 7 already complete)" in rerun.stdout, rerun.stderr
    inspected = cli(env, "inspect", url, "--sheet", tmp_path / "sheet.png")
    assert inspected.returncode == 0 and "noise: K=2, train 3, val 1" in inspected.stdout, inspected.stderr
    assert (tmp_path / "sheet.png").stat().st_size > 1000
    verified = cli(env, "verify", url)
    assert verified.returncode == 0 and "12 samples verified, no problems" in verified.stdout, verified.stderr
    for result in (built, rerun, inspected, verified):
        assert SECRET not in result.stdout + result.stderr and KEY_ID not in result.stdout + result.stderr

    hand = "runs/shards/hand-train-000000.tar"
    whole = client.get_object(Bucket="medsapiens-test", Key=hand)["Body"].read()
    client.put_object(Bucket="medsapiens-test", Key=hand, Body=whole[: len(whole) // 2])  # cut short since
    rerun = cli(env, "build", *sources, "--out", url, "--workers", 2, "--multipart-mb", 5)
    assert "(1 shard(s) written, 6 already complete)" in rerun.stdout, rerun.stderr
    assert client.get_object(Bucket="medsapiens-test", Key=hand)["Body"].read() == whole

    elsewhere = dict(manifest, shards=[dict(s, url=f"{url}/{s['url']}") for s in manifest["shards"]])
    elsewhere["shards"][0]["url"] = "s3://no-such-bucket/shard.tar"  # absolute, as a few-shot subset's are
    client.put_object(Bucket="medsapiens-test", Key="runs/subset/manifest.json", Body=json.dumps(elsewhere))
    verified = cli(env, "verify", "s3://medsapiens-test/runs/subset")
    assert verified.returncode == 1 and "s3://no-such-bucket/shard.tar: unreadable (" in verified.stdout, verified.stdout
    assert "NoSuchBucket" in verified.stdout
    assert "error: 1 problem(s) in s3://medsapiens-test/runs/subset" in verified.stderr  # the other shards read well

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    import webdataset as wds

    from medsapiens.io import storage

    storage._client_for_pid.cache_clear()  # clients made before the endpoint was set must not be reused
    storage.register_webdataset_opener()
    samples = list(wds.WebDataset(f"{url}/{noise['url']}", shardshuffle=False))
    carved = manifest["datasets"]["noise"]["source"]["validation"]["ids"]
    assert [s["__key__"] for s in samples] == [f"noise_train_n{i}" for i in range(4) if f"n{i}" not in carved]
    record = json.loads(samples[0]["json"])
    stored = Image.open(io.BytesIO(samples[0]["png"]))
    assert stored.mode == "I;16" and stored.size == (1000, 1000) and record["landmarks"][1] == [500.0, 600.0]
