"""Shards are read only as their manifest promised (medsapiens.io.shard_tar, used by training,
evaluation, verify and inspect): a compressed tar, a member claiming more bytes than the whole
shard, a shard longer than listed, an image over the build's max side and a shard whose sha256
changed are refused, naming the shard, before anything large is read or decoded."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import change_shard_padding
from PIL import Image

from medsapiens.data.pipeline import DataConfig, TrainStream, decode_sample, eval_examples, read_shard
from medsapiens.io.manifest import load as load_manifest
from medsapiens.io.record import Rejection
from medsapiens.io.shard_tar import ShardError
from medsapiens.launch.cli import main


@pytest.fixture
def shards(phantom_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(phantom_shards, copy)
    return copy


def replace_shard(shards, dataset: str, split: str, data: bytes, listed_bytes: int | None = None, rehash=True):
    """Put `data` in place of the first (dataset, split) shard; the manifest lists its size and sha256."""
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["dataset"] == dataset and s["split"] == split)
    (shards / entry["url"]).write_bytes(data)
    entry["bytes"] = len(data) if listed_bytes is None else listed_bytes
    if rehash:
        entry["sha256"] = hashlib.sha256(data).hexdigest()
    (shards / "manifest.json").write_text(json.dumps(manifest))
    manifest = load_manifest(shards)
    return manifest, next(s for s in manifest.shards if s.url == entry["url"])


def first_shard_bytes(shards, dataset="head", split="val") -> bytes:
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["dataset"] == dataset and s["split"] == split)
    return (shards / entry["url"]).read_bytes()


@pytest.mark.timeout(60)
def test_a_gzip_shard_is_refused_by_training_verify_and_inspect(shards, capsys):
    manifest, shard = replace_shard(shards, "head", "val", gzip.compress(first_shard_bytes(shards)))
    with pytest.raises(ShardError, match="a gzip-compressed tar; shards are uncompressed tars"):
        list(read_shard(manifest, shard))
    assert main(["shards", "verify", str(shards)]) == 1
    assert "gzip-compressed" in capsys.readouterr().out
    assert main(["shards", "inspect", str(shards)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gzip-compressed" in err and "Traceback" not in err


@pytest.mark.timeout(60)
def test_a_member_claiming_2_gib_is_refused_before_reading(shards):
    info = tarfile.TarInfo("head_val_x.png")
    info.size = 2 * 1024**3
    data = info.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * 4096
    manifest, shard = replace_shard(shards, "head", "val", data)
    with pytest.raises(ShardError, match=r"member head_val_x.png claims 2147483648 bytes, more than the whole shard"):
        list(read_shard(manifest, shard))


@pytest.mark.timeout(60)
def test_a_shard_longer_than_listed_is_refused(shards):
    data = first_shard_bytes(shards)
    manifest, shard = replace_shard(shards, "head", "val", data + b"\0" * 10240, listed_bytes=len(data))
    with pytest.raises(ShardError, match=f"longer than the {len(data)} bytes its manifest lists"):
        list(read_shard(manifest, shard))


@pytest.mark.timeout(60)
def test_an_image_over_max_side_is_refused_before_decoding(shards):
    manifest = load_manifest(shards)
    assert manifest.max_side == 128
    sample = next(read_shard(manifest, manifest.shards_for("head", "val")[0]))
    big = io.BytesIO()
    Image.fromarray(np.zeros((4000, 3000), np.uint8)).save(big, "PNG")
    with pytest.raises(Rejection, match="a 3000x4000 px image, over the shards' max side 128"):
        decode_sample({**sample, "png": big.getvalue()}, manifest.landmark_set("head"), manifest.max_side)


@pytest.mark.timeout(120)
def test_training_stops_on_a_shard_whose_sha256_changed(shards):
    change_shard_padding(shards, "head", "train")
    stream = TrainStream(load_manifest(shards), DataConfig(micro_batch=2, shuffle_buffer=4), ["head"], (96, 128), 0, 0)
    with pytest.raises(ShardError, match="the shard changed since it was built"):
        for _, _ in zip(range(100), stream, strict=False):
            pass


@pytest.mark.timeout(60)
def test_evaluation_reads_each_shard_it_takes_whole_to_its_end_where_sha256_and_count_are_checked(shards):
    """Evaluation, validation and calibration stopped reading a shard at its listed count, before the checks at its
    end: a swapped shard was scored, and one holding a sample more than listed lost it from the report."""
    change_shard_padding(shards, "head", "test1")
    manifest = load_manifest(shards)
    with pytest.raises(ShardError, match="the shard changed since it was built"):
        list(eval_examples(manifest, "head", "test1", (96, 128)))
    assert len(list(eval_examples(manifest, "head", "test1", (96, 128), limit=3))) == 3  # a shard cut short: unread
    listed = json.loads((shards / "manifest.json").read_text())
    entry = next(s for s in listed["shards"] if s["dataset"] == "head" and s["split"] == "test2")
    entry["samples"] -= 1
    listed["datasets"]["head"]["splits"]["test2"] -= 1
    listed["totals"]["inputs"] -= 1
    listed["totals"]["written"] -= 1
    (shards / "manifest.json").write_text(json.dumps(listed))
    given = []
    with pytest.raises(ShardError, match=f"{entry['samples'] + 1} samples, the manifest says {entry['samples']}"):
        given.extend(eval_examples(load_manifest(shards), "head", "test2", (96, 128)))
    assert len(given) == entry["samples"]  # no sample past the listed count: ranks make as many forward passes


@pytest.mark.timeout(120)
def test_training_stops_on_a_listed_shard_that_is_gone(shards):
    """A shard deleted (or unreadable) after the start: an error naming it, not a corrupt sample per draw,
    which stayed far under the corrupt-sample limit while training went on without that shard."""
    manifest = load_manifest(shards)
    gone = manifest.url_of(manifest.shards_for("head", "train")[0])
    Path(gone).unlink()
    stream = TrainStream(manifest, DataConfig(micro_batch=2, shuffle_buffer=4), ["head"], (96, 128), 0, 0)
    with pytest.raises(ShardError, match=f"{gone}: missing, though {shards} lists it"):
        for _, _ in zip(range(100), stream, strict=False):
            pass
    Path(gone).mkdir()  # there, but unreadable: an OSError other than a missing file
    stream = TrainStream(manifest, DataConfig(micro_batch=2, shuffle_buffer=4), ["head"], (96, 128), 0, 0)
    with pytest.raises(ShardError, match=f"{gone}: a shard the manifest lists cannot be read"):
        for _, _ in zip(range(100), stream, strict=False):
            pass


@pytest.mark.timeout(60)
def test_a_listed_shard_that_is_gone_is_named_with_its_manifest_by_evaluation_and_inspect(shards, capsys):
    """Evaluation, validation and calibration said only the OS's `[Errno 2] No such file or directory`."""
    manifest = load_manifest(shards)
    gone = manifest.url_of(manifest.shards_for("head", "test1")[0])
    Path(gone).unlink()
    with pytest.raises(ShardError, match=f"{gone}: missing, though {shards} lists it"):
        list(eval_examples(manifest, "head", "test1", (96, 128)))
    assert main(["shards", "inspect", str(shards)]) == 1
    assert f"error: {gone}: missing, though {shards} lists it" in capsys.readouterr().err
    assert main(["shards", "verify", str(shards)]) == 1
    assert f"{gone}: missing\n" in capsys.readouterr().out


def retarred(data: bytes, order) -> bytes:
    """The shard's members re-packed as `order` says: a list of (index of an existing member, new name or None)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index, name in order:
            member, payload = members[index]
            info = tarfile.TarInfo(name or member.name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("order, message", [
    ([(0, None), (1, None), (2, None), (3, None), (0, None), (1, None)], "appears twice; a shard holds each key once"),
    ([(0, None), (1, None), (0, None)], "has two"),
    ([(0, "../evil.png"), (1, "../evil.json")], "is not named <key>.<extension>"),
    ([(0, None), (1, None)], "1 samples, the manifest says"),
])
def test_a_shard_whose_keys_break_the_contract_is_refused_even_with_a_matching_sha256(shards, capsys, order, message):
    manifest, shard = replace_shard(shards, "head", "train", retarred(first_shard_bytes(shards, "head", "train"), order))
    with pytest.raises(ShardError, match=re.escape(message)):
        list(read_shard(manifest, shard))
    assert main(["shards", "verify", str(shards)]) == 1
    assert message in capsys.readouterr().out


def test_a_manifest_listing_a_shard_twice_is_refused(shards, capsys):
    """Its samples would count twice: split counts would still agree if edited to match."""
    manifest = json.loads((shards / "manifest.json").read_text())
    twice = next(s for s in manifest["shards"] if s["dataset"] == "head" and s["split"] == "train")
    manifest["shards"].append(twice)
    manifest["datasets"]["head"]["splits"]["train"] += twice["samples"]
    manifest["written"] = manifest.get("written", 0) + twice["samples"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert main(["shards", "verify", str(shards)]) == 1
    assert f"listed more than once: {twice['url']}" in capsys.readouterr().err


def set_first_shard(field, value):
    return lambda m: m["shards"][0].update({field: value})


@pytest.mark.parametrize("edit, message", [
    (set_first_shard("samples", "1"), "samples and bytes whole numbers"),
    (set_first_shard("bytes", -5), "samples and bytes whole numbers"),
    (set_first_shard("url", 5), "url, dataset, split and sha256 must be strings"),
    (set_first_shard("dataset", ["head"]), "url, dataset, split and sha256 must be strings"),
    (lambda m: m["datasets"]["head"]["splits"].update(train="1"), "splits must map split names to sample counts"),
    (lambda m: m["datasets"]["head"].update(source=[1]), "source must be an object"),
    (lambda m: m["datasets"]["head"]["source"].update(no_spacing_by_split={"val": "2"}),
     "source.no_spacing_by_split must map split names to image counts"),
    (lambda m: m["datasets"]["head"]["source"].update(rejected_by_split=[1]),
     "source.rejected_by_split must map split names to image counts"),
    (lambda m: m.update(build=[1]), "build an object"),
    (lambda m: m.update(datasets=[1]), "malformed manifest (AttributeError"),
    (lambda m: m["datasets"]["head"]["landmark_set"].update(sdr_radii="abc"), "sdr_radii must be a list"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_a_manifest_field_of_the_wrong_type_is_one_line(shards, capsys, edit, message):
    manifest = json.loads((shards / "manifest.json").read_text())
    edit(manifest)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert main(["shards", "verify", str(shards)]) == 1  # the shards fail their check
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
