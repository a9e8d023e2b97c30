"""Record fields are validated on read (medsapiens.io.record, used by verify, training and
evaluation): a zero scale, a negative orig_size, a size that does not match the stored image,
visibility flags other than 0/1 are refused, naming the sample; and a non-finite metric is an
error, never a number in a report or a best checkpoint."""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile

import numpy as np
import pytest
from conftest import with_first_record_changed

from medsapiens.data.pipeline import decode_sample, eval_examples
from medsapiens.evaluation.metrics import summarize
from medsapiens.io.manifest import load as load_manifest
from medsapiens.io.record import Rejection
from medsapiens.launch.cli import main

BAD_FIELDS = [
    ({"scale": [0, 0]}, "scale must be two positive numbers"),
    ({"scale": [float("nan"), 1.0]}, "scale must be two positive numbers"),
    ({"orig_size": [-96, 128]}, "orig_size must be two positive numbers"),
    ({"orig_size": [96.5, 128]}, "orig_size must be whole pixels"),
    ({"orig_size": [10**9, 128]}, "expected each side in"),
    ({"orig_size": [960, 1280]}, "does not give the stored image's"),
    ({"visible": [2] * 19}, "visible must be a list of 0 and 1"),
    ({"landmarks": [[float("inf"), 1.0]] * 19}, "NaN or inf at landmark(s)"),
    ({"names": ["a"]}, "names must list the 19 landmarks"),
    ({"landmarks": [["1.5", "2"]] * 19}, "landmarks must be a list of [x, y] number pairs"),
    ({"landmarks": [[1.0, 2.0], [3.0]] + [[1.0, 2.0]] * 17}, "landmarks must be a list of [x, y] number pairs"),
    ({"landmarks": [[1e308, 1e308]] * 19}, "at coordinates beyond 200000 px"),
    ({"spacing_mm": "12"}, "pixel spacing must be two positive numbers"),
    ({"spacing_mm": [10**400, 1]}, "pixel spacing must be two positive numbers"),  # past a float's range
    ({"scale": [10**400, 1]}, "scale must be two positive numbers"),
    ({"orig_size": [10**400, 128]}, "orig_size must be two positive numbers"),
    ({"landmarks": [[10**400, 1.0]] * 19}, "landmarks must be a list of [x, y]"),
]


def tamper(shards, change: dict):
    """Rewrite the first head val sample's record with `change`; the manifest gets the new
    size and sha256, so the record is the only thing wrong. Returns (shard path, key)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["dataset"] == "head" and s["split"] == "val")
    path = shards / entry["url"]
    data, key = with_first_record_changed(path, change)
    path.write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return path, key


@pytest.fixture
def shards(phantom_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(phantom_shards, copy)
    return copy


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change, message", BAD_FIELDS, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(BAD_FIELDS)])
def test_a_bad_field_is_refused_when_read_for_training_or_evaluation(shards, change, message):
    path, key = tamper(shards, change)
    with tarfile.open(path) as tar:
        sample = {m.name.partition(".")[2]: tar.extractfile(m).read() for m in tar.getmembers()
                  if m.name.startswith(key + ".")}
    manifest = load_manifest(shards)
    with pytest.raises(Rejection, match=f"sample {key}") as caught:
        decode_sample({**sample, "__key__": key, "__url__": str(path)}, manifest.landmark_set("head"))
    assert message in str(caught.value)
    with pytest.raises(Rejection) as caught:
        list(eval_examples(manifest, "head", "val", (96, 128)))
    assert message in str(caught.value) and key in str(caught.value)


@pytest.mark.timeout(60)
def test_verify_names_a_zero_scale(shards, capsys):
    _, key = tamper(shards, {"scale": [0, 0]})
    assert main(["shards", "verify", str(shards)]) == 1
    out = capsys.readouterr().out
    assert f"sample {key}: bad_annotation: scale must be two positive numbers" in out


@pytest.mark.timeout(30)
def test_a_non_finite_error_is_an_error_not_a_metric():
    errors = np.array([[1.0, 2.0], [np.nan, 1.0]])
    with pytest.raises(ValueError, match=r"non-finite errors on image\(s\) \['b'\]"):
        summarize(errors, [2.0], image_ids=["a", "b"])
    with pytest.raises(ValueError, match="no visible landmark"):
        summarize(errors, [2.0], mask=np.zeros_like(errors, dtype=bool))
    assert summarize(errors, [2.0], mask=np.isfinite(errors))["mre"] == pytest.approx(4 / 3)  # invisible: not counted


@pytest.mark.timeout(60)
def test_verify_checks_what_the_build_promised_beyond_each_record(shards, capsys):
    assert main(["shards", "verify", str(shards)]) == 0
    capsys.readouterr()
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["dataset"] == "head" and s["split"] == "val")
    with tarfile.open(shards / entry["url"]) as tar:
        record = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    _, key = tamper(shards, {"landmarks": [[-40.0, -40.0], *record["landmarks"][1:]], "visible": [1] * 19})
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["datasets"]["head"]["source"]["validation"]["ids"] == ["067"]
    manifest["datasets"]["head"]["source"]["validation"]["ids"] = ["068"]  # not the carved sample
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with open(shards / "rejected.jsonl", "a") as f:
        f.write(json.dumps({"source": "x", "dataset": "head", "id": "999", "reason": "unreadable_image", "detail": "?"}) + "\n")
    assert main(["shards", "verify", str(shards)]) == 1
    out = capsys.readouterr().out
    assert f"sample {key}: visible landmark(s) [0] lie outside the" in out
    assert "head/val: samples ['head_val_067', 'head_val_068'] differ from the ids the manifest says were carved" in out
    assert "rejected.jsonl: lists 1 rejected input(s), the manifest says 0" in out


def test_a_record_nested_too_deep_is_a_named_rejection_not_a_traceback(shards):
    manifest = load_manifest(shards)
    shard = manifest.shards_for("head", "val")[0]
    with tarfile.open(shards / shard.url) as tar:
        png = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png"))
    deep = b'{"landmarks": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    for record, message in ((deep, "its record is JSON nested too deep to read"), (b"[1, 2]", "its record is not a JSON object")):
        with pytest.raises(Rejection, match=f"sample x of y: {message}"):
            decode_sample({"png": png, "json": record, "__key__": "x", "__url__": "y"}, manifest.landmark_set("head"))


def test_a_sample_missing_a_part_or_with_a_broken_record_is_named_as_such_not_as_an_unreadable_image(shards):
    """A shard cut short ends on a sample without its .json; a record of bad JSON is no image's fault."""
    manifest = load_manifest(shards)
    shard = manifest.shards_for("head", "val")[0]
    with tarfile.open(shards / shard.url) as tar:
        parts = {m.name.partition(".")[2]: tar.extractfile(m).read() for m in tar.getmembers()[:2]}
    for sample, reason, message in (
            ({"png": parts["png"]}, "missing_annotation", "no .json part (it holds .png): a shard cut short"),
            ({"json": parts["json"]}, "missing_image", "no .png part (it holds .json)"),
            ({"cls": b"1"}, "missing_annotation", "no .json or .png part (it holds .cls)"),
            ({"png": parts["png"], "json": b"{oops"}, "bad_annotation", "its record is not valid JSON (Expecting"),
            ({"png": parts["png"], "json": b"\xff\xfe"}, "bad_annotation", "its record is not valid JSON")):
        with pytest.raises(Rejection) as caught:
            decode_sample({**sample, "__key__": "x", "__url__": "y"}, manifest.landmark_set("head"))
        assert caught.value.reason == reason and caught.value.detail.startswith(f"sample x of y: {message}"), caught.value
