"""What evaluate, predict, compare, calibrate and `model info` refuse, in one line naming the file, flag
or sample, before any work; and what predict lists in failures.json instead of losing it.

A tiny ONNX graph (constant landmarks, no training) with `medsapiens export onnx`'s metadata stands in
for an exported model, so predict runs in-process in a fraction of a second."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import refused_here
from PIL import Image

from medsapiens.errors import InputError
from medsapiens.evaluate.compare import comparison, markdown
from medsapiens.evaluate.predict import predict
from medsapiens.evaluate.report import build_report, score_files
from medsapiens.evaluation.metrics import Protocol
from medsapiens.io import registry
from medsapiens.io.imageio import decode, decode_png, to_float
from medsapiens.io.manifest import DatasetInfo, Manifest, ManifestError
from medsapiens.io.record import Rejection
from medsapiens.launch.cli import main

HEAD = registry.get("head")
SIZE = [24, 32]  # [W, H], as the metadata stores the input size


def metadata(**changes) -> dict:
    meta = {"format": "medsapiens-onnx", "version": 1,
            "input": {"name": "images", "size": SIZE, "margin": 1.25},
            "heads": {"head": 19}, "outputs": {"head": {"landmarks": "head_landmarks", "scores": "head_scores"}},
            "flip_test": {"head": False}, "landmark_sets": {"head": HEAD.to_dict()},
            "calibration": {"head": {"radii": [1.0] * 19, "unit": "mm", "coverage": 0.9, "split": "val",
                                     "images": 10}}}
    return {**meta, **changes}


def tiny_onnx(path: Path, meta, graph_size=(SIZE[1], SIZE[0]), batch="batch", k=19, allocates=0) -> Path:
    """(B, 3, H, W) -> landmarks (B, k, 2) at the centre of a SIZE input, scores (B, k) of 1, with `meta` (a dict,
    or raw text) as its `medsapiens` metadata; `allocates` float32 values more at run time, added times 0."""
    import onnx
    from onnx import TensorProto, helper

    h, w = graph_size
    nodes = [helper.make_node("ConstantOfShape", ["allocated"], ["big"], value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1])),
             helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
             helper.make_node("Mul", ["total", "zero"], ["no_total"]),
             helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Reshape", ["mean", "shape3"], ["m3"]),
             helper.make_node("Mul", ["m3", "no_total"], ["z3"]),
             helper.make_node("Add", ["z3", "centre"], ["head_landmarks"]),
             helper.make_node("Reshape", ["mean", "shape2"], ["m2"]),
             helper.make_node("Mul", ["m2", "zero"], ["z2"]),
             helper.make_node("Add", ["z2", "ones"], ["head_scores"])]
    constants = [helper.make_tensor("allocated", TensorProto.INT64, [1], [allocates]),
                 helper.make_tensor("shape3", TensorProto.INT64, [3], [-1, 1, 1]),
                 helper.make_tensor("shape2", TensorProto.INT64, [2], [-1, 1]),
                 helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                 helper.make_tensor("centre", TensorProto.FLOAT, [1, k, 2], [SIZE[0] / 2, SIZE[1] / 2] * k),
                 helper.make_tensor("ones", TensorProto.FLOAT, [1, k], [1.0] * k)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, h, w])],
        [helper.make_tensor_value_info("head_landmarks", TensorProto.FLOAT, ["batch", k, 2]),
         helper.make_tensor_value_info("head_scores", TensorProto.FLOAT, ["batch", k])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    helper.set_model_props(model, {"medsapiens": meta if isinstance(meta, str) else json.dumps(meta)})
    onnx.save(model, str(path))
    return path


@pytest.fixture
def model(tmp_path) -> Path:
    return tiny_onnx(tmp_path / "tiny.onnx", metadata())


def images(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("L", (40, 30), 128).save(folder / name)
    return folder


# 1. ONNX metadata

def test_a_tiny_model_with_valid_metadata_predicts(model, tmp_path):
    results, failures = predict([str(images(tmp_path / "in", "a.png"))], tmp_path / "out", onnx=model)
    assert failures == [] and len(results) == 1
    assert results[0]["size"] == [40, 30] and np.isfinite(results[0]["landmarks"]).all()


@pytest.mark.parametrize(("meta", "message"), [
    ("{not json", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "nested too deep"),
    ([1, 2], "not exported by `medsapiens export onnx`"),
    ({k: v for k, v in metadata().items() if k != "flip_test"}, "missing key 'flip_test'"),
    (metadata(input={"name": "images", "size": SIZE}), "missing key 'margin'"),
    (metadata(input={"size": SIZE, "margin": float("nan")}), "input.margin must be a number from 1 to 4"),
    (metadata(input={"size": SIZE, "margin": -1}), "input.margin must be a number from 1 to 4"),
    (metadata(input={"size": SIZE, "margin": 1e-300}), "input.margin must be a number from 1 to 4"),  # all at the centre
    (metadata(input={"size": SIZE, "margin": 1e300}), "input.margin must be a number from 1 to 4"),
    (metadata(input={"size": [24], "margin": 1.25}), "input.size must be [W, H], two integers from 1 to 8192"),
    (metadata(input={"size": [24, "32"], "margin": 1.25}), "input.size must be [W, H], two integers from 1 to 8192"),
    (metadata(input={"size": [4000, 4000], "margin": 1.25}), "not the graph's input width and height [24, 32]"),
    (metadata(input={"size": [32, 24], "margin": 1.25}), "not the graph's input width and height [24, 32]"),
    (metadata(outputs={"head": {"landmarks": "head_landmarks", "scores": "nope"}}), "['nope'], not among"),
    (metadata(landmark_sets={"head": {**HEAD.to_dict(), "unit": "inch"}}), "unit must be 'mm' or 'px'"),
    (metadata(landmark_sets={"head": [1]}), "landmark_sets must map each head to an object"),
    (metadata(landmark_sets={"head": {**HEAD.to_dict(), "flip_pairs": [[0, 1], [1, 2]]}}),
     "flip pairs [[0, 1], [1, 2]] put landmark 1 in two pairs"),
    (metadata(heads={"head": 5}), "heads {'head': 5} disagree with the landmark sets"),
    (metadata(flip_test={"head": "yes"}), "flip_test of 'head' must be true or false"),
    (metadata(flip_test={}), "flip_test of 'head' must be true or false"),
    (metadata(outputs={}), "outputs has no object for head 'head'"),
    (metadata(calibration={"head": {"radii": [1.0] * 3}}), "calibration of 'head': radii must be 19"),
    (metadata(calibration={"hand": {}}), "calibration of 'hand', which is not one of its heads"),
])
def test_onnx_metadata_is_checked_in_one_line_naming_the_file(tmp_path, meta, message):
    from medsapiens.deploy.runtime import OnnxLandmarker

    path = tiny_onnx(tmp_path / "bad.onnx", meta)
    with pytest.raises(InputError) as refused:
        OnnxLandmarker(path)
    text = str(refused.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text, text


def test_an_onnx_graph_with_an_input_larger_than_any_model_takes_is_refused_before_any_image(tmp_path):
    """Its metadata agreeing with its graph, a 2 KB file would have predict allocate gigabytes per image."""
    from medsapiens.deploy.runtime import OnnxLandmarker

    path = tiny_onnx(tmp_path / "huge.onnx", metadata(input={"size": [16384, 16384], "margin": 1.25}),
                     graph_size=(16384, 16384))
    with pytest.raises(InputError, match=r"input.size must be \[W, H\], two integers from 1 to 8192, got \[16384, "):
        OnnxLandmarker(path)


def test_an_onnx_graph_without_a_fixed_input_size_is_refused(tmp_path):
    from medsapiens.deploy.runtime import OnnxLandmarker

    path = tiny_onnx(tmp_path / "dynamic.onnx", metadata(), graph_size=("h", "w"))
    with pytest.raises(InputError, match="fixed H and W"):
        OnnxLandmarker(path)
    path = tiny_onnx(tmp_path / "one.onnx", metadata(), batch=1)  # would fail on a batch of two
    with pytest.raises(InputError, match="of any batch B"):
        OnnxLandmarker(path)


def test_an_onnx_graph_giving_other_shapes_than_its_metadata_is_one_line(tmp_path, capsys):
    path = tiny_onnx(tmp_path / "three.onnx", metadata(), k=3)  # 3 landmarks where its metadata says 19
    folder = images(tmp_path / "in", "a.png", "b.png")
    refused_here(capsys, ["predict", "--onnx", str(path), "--out", str(tmp_path / "out"), str(folder)],
                 f"{path}: head 'head' gave landmarks (2, 3, 2) and scores (2, 3) for 2 image(s), not (2, 19, 2)")


def test_an_onnx_graph_allocating_past_the_memory_cap_is_one_line(tmp_path, monkeypatch):
    """The cap is one allocator for the whole process, so the command runs in its own."""
    import subprocess
    import sys

    from medsapiens.deploy.runtime import memory_cap

    path = tiny_onnx(tmp_path / "greedy.onnx", metadata(), allocates=300_000_000)  # 1.2 GB, in a 3 KB file
    assert path.stat().st_size < 4000
    folder = images(tmp_path / "in", "a.png")
    proc = subprocess.run([sys.executable, "-m", "medsapiens.launch.cli", "predict", "--onnx", str(path), "--out",
                           str(tmp_path / "out"), str(folder)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MEDSAPIENS_ONNX_MEMORY_GB": "0.2"})
    assert proc.returncode == 2 and proc.stderr == (  # onnxruntime's own log lines silenced
        f"error: {path}: head 'head' could not run on 1 image(s): it asked for 1.2 GB with 0.2 GB left of the 0.2 GB "
        "it may use (set MEDSAPIENS_ONNX_MEMORY_GB to allow more)\n")
    for bad in ("0", "-1", "nan", "lots", "1e12"):
        monkeypatch.setenv("MEDSAPIENS_ONNX_MEMORY_GB", bad)
        with pytest.raises(InputError, match=f"MEDSAPIENS_ONNX_MEMORY_GB='{bad}': must be a number of GB above 0, at "
                                             "most 1e"):
            memory_cap()


# 2, 3. predict: reserved ids, unreadable folders

def test_images_named_like_the_summary_files_are_listed_not_overwritten(model, tmp_path):
    folder = images(tmp_path / "in", "predictions.png", "Failures.png", "ok.png")
    results, failures = predict([str(folder)], tmp_path / "out", onnx=model)
    assert [r["id"] for r in results] == ["ok"]
    assert sorted((Path(f["image"]).name, f["reason"]) for f in failures) == [
        ("Failures.png", "reserved_id"), ("predictions.png", "reserved_id")]
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert summary["landmarks"].keys() == {"ok"}  # the summary, not an image's result
    assert len(json.loads((tmp_path / "out" / "failures.json").read_text())) == 2


def test_an_out_holding_an_earlier_run_is_refused_unless_overwritten(model, tmp_path, capsys):
    out = tmp_path / "out"
    earlier = images(tmp_path / "earlier", "a.png", "b.png")
    later = images(tmp_path / "later", "c.png") / "c.png"
    assert main(["predict", "--onnx", str(model), "--overlays", "--out", str(out), str(earlier)]) == 0
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.rglob("*"))
    refused_here(capsys, ["predict", "--onnx", str(model), "--out", str(out), str(later)],
                 "holds the predictions of an earlier run (2 image(s))", "--overwrite")
    assert sorted(p.name for p in out.rglob("*")) == before
    assert main(["predict", "--onnx", str(model), "--overwrite", "--out", str(out), str(later)]) == 0
    assert sorted(p.name for p in out.rglob("*")) == ["c.json", "failures.json", "notes.txt", "overlays",
                                                       "predictions.json"]
    (out / "predictions.json").write_text(json.dumps({"landmarks": {"../notes": [[1, 2]]}}))
    for flags in ([], ["--overwrite"]):
        refused_here(capsys, ["predict", "--onnx", str(model), *flags, "--out", str(out), str(later)],
                     "is not a predictions file of `medsapiens predict`")
    assert (out / "notes.txt").read_text() == "mine" and (out / "c.json").is_file()


def test_a_folder_that_cannot_be_listed_is_a_listed_failure(model, tmp_path, monkeypatch):
    folder = images(tmp_path / "in", "a.png")
    locked = images(folder / "locked", "b.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:  # as chmod 000 does for a user other than root
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    results, failures = predict([str(folder)], tmp_path / "out", onnx=model)
    assert [r["id"] for r in results] == ["a"]
    assert failures == [{"image": str(locked), "reason": "unreadable_folder",
                         "detail": f"{locked}: Permission denied; the images in it were not predicted"}]
    assert json.loads((tmp_path / "out" / "failures.json").read_text()) == failures


def test_a_folder_is_walked_through_links_and_images_it_cannot_read_are_listed(model, tmp_path):
    folder = images(tmp_path / "in", "a.png")
    (folder / "b.webp").write_bytes(b"RIFF....WEBP")
    (folder / "notes.txt").write_text("taken on the ward")
    (folder / "report.pdf").write_bytes(b"%PDF-1.4")  # not an image, though PIL knows the suffix
    (folder / ".#notes.txt").symlink_to("root@ward.1234")  # an editor's lock: no image, gone or not
    elsewhere = images(tmp_path / "store" / "batch2", "c.png")
    Image.new("L", (40, 30), 128).save(elsewhere / "d.JPE", format="JPEG")
    (folder / "batch2").symlink_to(elsewhere)
    (elsewhere / "back").symlink_to(folder)  # a loop: each real folder is walked once
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(folder / "scan.png")  # named as an image, not a file: listed, never opened (it would block)
    (folder / "null.dcm").symlink_to("/dev/null")
    results, failures = predict([str(folder)], tmp_path / "out", onnx=model)
    assert [r["id"] for r in results] == ["a", "c", "d"]  # c and d through the linked folder
    assert sorted((Path(f["image"]).name, f["reason"]) for f in failures) == [
        ("b.webp", "unsupported_image"), ("gone.png", "missing_image"), ("null.dcm", "unreadable_image"),
        ("scan.png", "unreadable_image")]  # the other files: passed over


PEAK_OF_A_RUN = """
import json, sys
from medsapiens.evaluate.predict import PredictOptions, predict
results, _ = predict([sys.argv[2]], sys.argv[3], PredictOptions(batch_size=int(sys.argv[4])), onnx=sys.argv[1])
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"predicted": len(results), "peak_mib": int(peak.split()[1]) / 1024}))
"""


def test_a_batch_keeps_model_inputs_not_the_full_size_images(model, tmp_path):
    """Eight 9-megapixel radiographs (36 MB each as floats) in one batch cost about what one does."""
    import subprocess
    import sys

    folder = tmp_path / "large"
    folder.mkdir()
    for n in range(8):
        Image.new("L", (3000, 3000), 100 + n).save(folder / f"x{n}.png")
    peaks = {}
    for batch in (1, 8):
        proc = subprocess.run([sys.executable, "-c", PEAK_OF_A_RUN, str(model), str(folder), str(tmp_path / f"b{batch}"),
                               str(batch)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        run = json.loads(proc.stdout.splitlines()[-1])
        assert run["predicted"] == 8
        peaks[batch] = run["peak_mib"]
    assert peaks[8] - peaks[1] < 100, peaks  # holding the images would take 7 x 34 MiB more


STOPPED_AT_THIRD = """
import os, signal, sys
from medsapiens.evaluate import predict
from medsapiens.launch.cli import command
read, seen = predict.read_input, []
def read_input(*args):
    seen.append(args[0])
    if len(seen) == 3:  # the signal arrives while the third image is read: a scheduler's time limit, the OOM killer
        os.kill(os.getpid(), signal.SIG{signal})
    return read(*args)
predict.read_input = read_input
command()
"""


def predict_stopped_at_third(signal: str, model, folder, out):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", STOPPED_AT_THIRD.format(signal=signal), "predict", "--onnx",
                           str(model), "--batch-size", "1", "--out", str(out), str(folder)],
                          capture_output=True, text=True, timeout=120)


def test_a_predict_stopped_by_sigterm_writes_its_summaries_and_is_not_mixed_with_the_next(model, tmp_path, capsys):
    folder, out = images(tmp_path / "in", *(f"i{n}.png" for n in range(6))), tmp_path / "out"
    stopped = predict_stopped_at_third("TERM", model, folder, out)
    assert not (out / "in_progress.jsonl").exists()
    assert stopped.returncode == 130 and stopped.stderr.strip().endswith("interrupted"), stopped.stderr
    listed = json.loads((out / "predictions.json").read_text())["landmarks"]
    assert sorted(listed) == ["i0", "i1"] == sorted(p.stem for p in out.glob("i*.json"))  # the summary names them
    refused_here(capsys, ["predict", "--onnx", str(model), "--out", str(out), str(folder)],
                 "holds the predictions of an earlier run (2 image(s))")


def test_a_predict_killed_outright_leaves_a_journal_that_the_next_run_refuses_or_clears(model, tmp_path, capsys):
    folder, out = images(tmp_path / "in", *(f"i{n}.png" for n in range(6))), tmp_path / "out"
    (out / "keep.txt").parent.mkdir()
    (out / "keep.txt").write_text("not predict's")
    killed = predict_stopped_at_third("KILL", model, folder, out)
    assert killed.returncode == -9 and not (out / "predictions.json").exists()
    assert sorted(p.stem for p in out.glob("i*.json")) == ["i0", "i1"]
    with (out / "in_progress.jsonl").open("a") as journal:
        journal.write('"i2')  # a line the kill cut short: its files were not begun
    refused_here(capsys, ["predict", "--onnx", str(model), "--out", str(out), str(folder)],
                 "killed before it wrote its summaries (2 image(s))", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["i0.json", "i1.json", "in_progress.jsonl", "keep.txt"]
    (out / "i0.json").write_text("stale")
    assert main(["predict", "--onnx", str(model), "--out", str(out), "--overwrite", str(folder / "i1.png")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["failures.json", "i1.json", "keep.txt", "predictions.json"]
    (out / "in_progress.jsonl").write_text('"../keep"\n')
    refused_here(capsys, ["predict", "--onnx", str(model), "--out", str(out), "--overwrite", str(folder)],
                 "is not a journal of `medsapiens predict`")
    assert (out / "keep.txt").exists()


# 4, 5, 7. flags refused up front

@pytest.mark.parametrize("command", [
    ["evaluate", "--bundle", "b", "--shards", "s", "--out", "o"],
    ["predict", "--onnx", "m.onnx", "x.png"],
    ["calibrate", "b", "--shards", "s"],
])
@pytest.mark.parametrize("size", ["0", "-3"])
def test_a_batch_size_below_one_is_refused(capsys, command, size):
    refused_here(capsys, [*command, f"--batch-size={size}"], "--batch-size", "expected a positive integer")


def test_an_out_that_is_a_file_is_refused_before_any_work(model, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    image = images(tmp_path / "in", "a.png") / "a.png"
    for out in (taken, taken / "sub"):
        refused_here(capsys, ["predict", "--onnx", str(model), "--out", str(out), str(image)], "is a file")
        refused_here(capsys, ["evaluate", "--bundle", str(tmp_path / "none"), "--shards", str(tmp_path),
                              "--out", str(out)], f"{taken} is a file")
        refused_here(capsys, ["evaluate", "--compare", "a.json", "b.json", "--out", str(out)], "is a file")
    assert taken.read_text() == "keep me"


def test_a_device_is_checked_before_a_model_is_loaded(model, tmp_path, capsys):
    import torch

    image = str(images(tmp_path / "in", "a.png") / "a.png")
    evaluate = ["evaluate", "--bundle", str(tmp_path / "none"), "--shards", str(tmp_path), "--out", str(tmp_path / "o")]
    refused_here(capsys, [*evaluate, "--device", "gpu0"], "--device 'gpu0'", "cpu, cuda or cuda:N")
    refused_here(capsys, ["calibrate", str(tmp_path), "--shards", "s", "--device", "meta"], "--device 'meta'")
    refused_here(capsys, ["predict", "--onnx", str(model), "--device", "cuda", "--out", str(tmp_path / "p"),
                          image], "--device cuda with --onnx", "CPU")
    count = torch.cuda.device_count()
    refused_here(capsys, [*evaluate, "--device", f"cuda:{count}"], f"{count} CUDA device(s) available")


# 6. --hand-landmarks

@pytest.mark.parametrize("pair", ["-1,5", "a,b", "1", "1,2,3", "3,3"])
def test_hand_landmarks_must_be_two_different_indices(capsys, tmp_path, pair):
    refused_here(capsys, ["evaluate", "--predictions", "p", "--ground-truth", "g", "--out", str(tmp_path),
                          f"--hand-landmarks={pair}"], "--hand-landmarks", "two different 0-based")


def test_hand_landmarks_beyond_the_landmark_set_are_refused(tmp_path):
    points = [[float(10 + 3 * k), float(20 + k)] for k in range(37)]
    for name in ("p", "g"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"dataset": "hand", "landmarks": {"x": points}}))
    with pytest.raises(InputError, match=r"--hand-landmarks 1,99: hand has landmarks 0\.\.36"):
        score_files(tmp_path / "p.json", tmp_path / "g.json", (1, 99))
    assert score_files(tmp_path / "p.json", tmp_path / "g.json", (1, 36))[0]["mre"] == 0.0


# 8. images

def test_a_multi_page_tiff_needs_a_page(tmp_path):
    path = tmp_path / "pages.tif"
    first, second = (Image.new("L", (32, 24), v) for v in (10, 200))
    first.save(path, save_all=True, append_images=[second])
    with pytest.raises(Rejection) as refused:
        decode(str(path))
    assert refused.value.reason == "multi_frame" and "multi-page image; choose a page" in refused.value.detail
    assert decode(str(path), 1).max() == 200 and decode(str(path), 0).max() == 10
    with pytest.raises(Rejection, match="there is no page 2"):
        decode(str(path), 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_float_tiff_with_non_finite_pixels_is_unreadable(tmp_path, bad):
    values = np.full((24, 32), 100.0, np.float32)
    values[3, 4] = bad
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    with pytest.raises(Rejection) as refused:
        decode(str(tmp_path / "f.tif"))
    assert refused.value.reason == "unreadable_image" and "NaN or infinite pixels" in refused.value.detail


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_a_deep_tiff_stored_white_is_zero_is_read_with_bone_bright(tmp_path, dtype):
    """PIL inverts an 8-bit WhiteIsZero TIFF as it reads it, but hands 16-bit and float ones over as stored."""
    shown = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (24, 1))
    Image.fromarray(shown).save(tmp_path / "shown.png")
    Image.fromarray((65535 - shown.astype(np.uint16) * 257).astype(dtype)).save(tmp_path / "deep.tif",
                                                                                 tiffinfo={262: 0})
    assert Image.open(tmp_path / "deep.tif").tag_v2[262] == 0
    read, expected = (to_float(decode(str(tmp_path / name))) for name in ("deep.tif", "shown.png"))
    assert np.abs(read - expected).max() <= 0.5


def test_a_float_image_of_fractions_is_scaled_not_rounded_to_black_and_white(tmp_path):
    fractions = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (24, 1))
    Image.fromarray(fractions, "F").save(tmp_path / "unit.tif")
    Image.fromarray(np.rint(fractions * 255).astype(np.uint8)).save(tmp_path / "eight_bit.png")
    as_fractions, as_bytes = to_float(decode(str(tmp_path / "unit.tif"))), to_float(decode(str(tmp_path / "eight_bit.png")))
    assert np.abs(as_fractions - as_bytes).max() <= 0.5  # the same picture, within an 8-bit rounding


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_an_image_is_read_upright_as_its_orientation_tag_shows_it(tmp_path, suffix):
    from medsapiens.io.imageio import displayed_size, open_image

    stored = np.zeros((40, 60), np.uint8)
    stored[5:8, 50:53] = 255  # near the top right corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers turn it 90 degrees clockwise: the spot comes to the bottom right
    Image.fromarray(stored).save(tmp_path / f"r{suffix}", exif=exif, **({"quality": 100} if suffix == ".jpg" else {}))
    shown = decode(str(tmp_path / f"r{suffix}"))
    assert shown.shape == (60, 40) and np.unravel_index(shown.argmax(), shown.shape) in {(50, 32), (50, 33), (50, 34)}
    with open_image(tmp_path / f"r{suffix}") as image:
        assert displayed_size(image, "r") == (40, 60)


def test_the_size_a_reader_takes_from_a_header_is_bounded_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    from medsapiens.io.imageio import displayed_size, open_image

    Image.new("L", (400, 300)).save(tmp_path / "wide.png")
    monkeypatch.setenv("MEDSAPIENS_MAX_PIXELS", "100000")
    with open_image(tmp_path / "wide.png") as image, pytest.raises(Rejection, match="400x300 px is 0 megapixels"):
        displayed_size(image, tmp_path / "wide.png")  # a PNG's orientation may need its pixels decoded


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_a_tiff_stored_turned_is_refused_not_read_garbled(tmp_path, compression):
    path = tmp_path / "turned.tif"
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(path, tiffinfo={0x0112: 6}, compression=compression)
    with pytest.raises(Rejection) as refused:
        decode(str(path))
    assert refused.value.reason == "unreadable_image" and "stored turned or mirrored (Orientation 6)" in refused.value.detail


# 9. deeply nested JSON

def test_deeply_nested_prediction_files_are_one_line(tmp_path):
    (tmp_path / "deep.json").write_text('{"landmarks": ' + "[" * 100000 + "]" * 100000 + "}")
    (tmp_path / "g.json").write_text(json.dumps({"dataset": "head", "landmarks": {}}))
    with pytest.raises(InputError, match="deep.json: JSON nested too deep"):
        score_files(tmp_path / "deep.json", tmp_path / "g.json")
    with pytest.raises(InputError, match="deep.json: JSON nested too deep"):
        score_files(tmp_path / "g.json", tmp_path / "deep.json")
    with pytest.raises(InputError, match=r"g\.json and .*g\.json hold no image to score"):  # empty, not a traceback
        score_files(tmp_path / "g.json", tmp_path / "g.json")



@pytest.mark.parametrize("field, value, message", [
    ("landmarks", {"x": [[10**400, 1.0]] * 19}, "image x, landmark 0: expected [x, y] (two finite numbers)"),  # past a float's range
    ("spacing_mm", [0.1, 0.1], '"spacing_mm" must map each image id'),
    ("image_size", {"x": [1935, 2400]}, None),
])
def test_wrong_values_in_a_landmark_file_are_one_line_naming_it(tmp_path, field, value, message):
    points = [[float(10 + 3 * k), float(20 + k)] for k in range(19)]
    (tmp_path / "g.json").write_text(json.dumps({"dataset": "head", "landmarks": {"x": points}}))
    (tmp_path / "p.json").write_text(json.dumps({"dataset": "head", "landmarks": {"x": points}, field: value}))
    if message is None:  # the well-formed twin: read and scored
        assert score_files(tmp_path / "p.json", tmp_path / "g.json")[0]["mre"] == 0.0
        return
    with pytest.raises(InputError, match=rf"predictions file {re.escape(str(tmp_path / 'p.json'))}: .*{re.escape(message)}"):
        score_files(tmp_path / "p.json", tmp_path / "g.json")


# 10. compare

IDS = [f"i{n}" for n in range(6)]


def report_file(path: Path, scale: float = 1.0, dataset: str = "head", **changes) -> str:
    errors = np.random.default_rng(0).gamma(2.0, scale, (len(IDS), 19))
    report = build_report(errors, np.ones_like(errors, bool), IDS, Protocol(HEAD), dataset, "synthetic",
                          np.full((len(IDS), 2), 0.1))
    path.write_text(json.dumps({**report, **changes}))
    return str(path)


@pytest.mark.parametrize(("changes", "message"), [
    ({"mre": "1.5"}, "mre must be finite numbers"),
    ({"mre_std_images": float("inf")}, "mre_std_images must be finite numbers"),
    ({"per_image": {"i0": "1.5"}}, "per_image must map each image id to its MRE"),
    ({"per_image": {"i0": float("inf")}}, "per_image must map each image id to its MRE"),
    ({"sdr": [1, 2]}, "sdr must map each radius"),
    ({"per_landmark": [1]}, "per_landmark must map each landmark name"),
    ({"unit": ["mm"]}, "unit and dataset must be strings"),
])
def test_compare_checks_each_reports_fields(tmp_path, changes, message):
    good = report_file(tmp_path / "a.json")
    bad = report_file(tmp_path / "b.json", **changes)
    with pytest.raises(InputError) as refused:
        comparison([good, bad])
    assert str(refused.value).startswith(f"{bad}: {message}"), refused.value


def test_compare_leaves_nan_images_out_of_the_test_and_counts_them(tmp_path):
    nan_everywhere = {i: float("nan") for i in IDS}
    a = report_file(tmp_path / "a.json")
    b = report_file(tmp_path / "b.json", 1.3, per_image={**nan_everywhere, "i0": 2.0, "i1": 3.0})
    test = comparison([a, b])["paired"][0]
    assert test["images"] == 2 and test["left_out"] == 4 and test["p"] == 0.5  # 2 images: 2 of 4 sign patterns
    only_nan = report_file(tmp_path / "c.json", per_image=nan_everywhere)
    assert comparison([a, only_nan])["paired"][0] == {"images": 0, "mean_difference": None, "p": None, "left_out": 6}


def test_compare_refuses_reports_of_different_datasets_or_rules_and_shows_how_each_was_measured(tmp_path):
    a, b = report_file(tmp_path / "a.json"), report_file(tmp_path / "b.json", dataset="aariz")
    with pytest.raises(InputError, match=r"different datasets \(aariz; head\)"):
        comparison([a, b])
    loose = report_file(tmp_path / "c.json", sdr_convention="error <= r")  # the same predictions, counted otherwise
    with pytest.raises(InputError, match=r"different SDR conventions \(error < r; error <= r\)"):
        comparison([a, loose])
    flipped = report_file(tmp_path / "d.json", evaluated_on="test1", flip_test=True)
    table = markdown(comparison([a, flipped]))
    assert "| measured on |" in table and "| test1, flip test |" in table and "SDR < 2 mm (%)" in table


# 11. evaluate: the bundle's landmarks are the shards'

@pytest.mark.parametrize(("change", "message"), [
    ({"names": ("nasion", *registry.ISBI_NAMES[1:])}, "landmark 0's name: bundle 'sella', shards 'nasion'"),
    ({"unit": "px"}, "unit: bundle 'mm', shards 'px'"),
])
def test_evaluate_refuses_a_head_with_other_landmarks_of_the_same_count(change, message):
    from dataclasses import replace

    from medsapiens.evaluate.evaluate import check_split

    manifest = Manifest({"head": DatasetInfo(replace(HEAD, **change), {"test": 3})}, [], 3, 0)
    bundle = SimpleNamespace(heads={"head": 19}, landmark_sets={"head": HEAD})
    with pytest.raises(ManifestError, match=message):
        check_split(manifest, "head", "test", bundle)
    check_split(Manifest({"head": DatasetInfo(HEAD, {"test": 3})}, [], 3, 0), "head", "test", bundle)


def test_evaluate_calibrate_and_finetune_refuse_a_split_the_build_found_images_without_spacing_in():
    from medsapiens.evaluate.evaluate import check_split
    from medsapiens.finetune.train import evaluation_splits

    needs = {d: registry.BUILTIN[d].needs_spacing for d in ("head", "hand", "chest", "leg", "aariz")}
    assert needs == {"head": False, "hand": False, "chest": False, "leg": True, "aariz": True}  # native, wrist, px
    leg = registry.BUILTIN["leg"]
    bundle = SimpleNamespace(heads={"leg": 26}, landmark_sets={"leg": leg})
    manifest = Manifest({"leg": DatasetInfo(leg, {"test": 3, "val": 2}, {"no_spacing_by_split": {"test": 1}})},
                        [], 5, 0, location="/shards")
    with pytest.raises(ManifestError, match="/shards: 1 of the 3 'test' images of dataset 'leg' have no pixel spacing"):
        check_split(manifest, "leg", "test", bundle)
    check_split(manifest, "leg", "val", bundle)
    with pytest.raises(ManifestError, match="1 of the 3 'test' images"):  # fine-tuning: before training
        evaluation_splits(manifest, "leg", "auto")


# 12. model info

@pytest.mark.parametrize("flags", [["--trunk-width", "0"], ["--trunk-width", "-5"], ["--heads", "-100"],
                                   ["--heads", "0"]])
def test_model_info_refuses_widths_and_heads_below_one(capsys, flags):
    refused_here(capsys, ["model", "info", "--arch", "sapiens_tiny", *flags], flags[0],
                 "expected a positive integer")


def test_an_image_file_holding_postscript_never_reaches_ghostscript(tmp_path, monkeypatch):
    """PIL knows formats whose loading runs programs (EPS runs Ghostscript on the file's PostScript):
    only PNG, JPEG, BMP and TIFF are opened, whatever the name; a shard's image, PNG only."""
    ran = tmp_path / "ghostscript-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    postscript = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n{} loop\n%%EOF\n"
    (tmp_path / "x.png").write_bytes(postscript)
    with pytest.raises(Rejection) as refused:
        decode(str(tmp_path / "x.png"))
    assert refused.value.reason == "unreadable_image" and "not a PNG, JPEG, BMP or TIFF image" in refused.value.detail
    with pytest.raises(OSError):
        decode_png(postscript)
    assert not ran.exists()


def test_evaluate_scores_files_by_the_dataset_given_and_refuses_flags_it_would_not_read(tmp_path, capsys):
    points = [[float(10 + 3 * k), float(20 + k)] for k in range(19)]
    shifted = [[x + 5.0, y] for x, y in points]
    for name, landmarks in (("g", points), ("p", shifted)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"landmarks": {"x": landmarks}}))  # no dataset named
    files = ["evaluate", "--predictions", str(tmp_path / "p.json"), "--ground-truth", str(tmp_path / "g.json")]
    assert main([*files, "--dataset", "head", "--out", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["dataset"] == "head" and report["mre"] == pytest.approx(0.5)  # 5 px at ISBI's 0.1 mm/px
    refused_here(capsys, [*files, "--dataset", "head", "--hand-landmarks", "0,4", "--out", str(tmp_path / "h")],
                 "--hand-landmarks 0,4: head's errors are not scaled by a wrist width, so the flag would change "
                 "nothing; leave it out")
    (tmp_path / "p.json").write_text(json.dumps({"dataset": "head", "landmarks": {"x": shifted}}))
    refused_here(capsys, [*files, "--dataset", "leg", "--out", str(tmp_path / "f")],
                 "--dataset leg: the files are for dataset 'head'")
    unread = ["--split", "val", "--overlays", "3", "--no-flip-test"]
    refused_here(capsys, [*files, *unread, "--out", str(tmp_path / "f")],
                 "--split, --overlays, --flip-test are not read with --predictions and --ground-truth")
    report_path = str(tmp_path / "e" / "report.json")
    refused_here(capsys, ["evaluate", "--compare", report_path, report_path, "--shards", "s", "--dataset", "leg",
                          "--sdr-convention", "<="],
                 "--shards, --dataset, --sdr-convention are not read with --compare")
    refused_here(capsys, ["evaluate", "--bundle", "b", "--shards", "s", "--overlays", "-1", "--out", "o"],
                 "--overlays", "expected a whole number of at least 0")


def test_a_folder_given_for_a_file_and_a_file_for_a_bundle_are_one_line(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "g.json").write_text(json.dumps({"dataset": "head", "landmarks": {}}))
    refused_here(capsys, ["evaluate", "--predictions", str(tmp_path / "p"), "--ground-truth",
                          str(tmp_path / "g.json"), "--out", str(tmp_path / "e")],
                 f"predictions file {tmp_path / 'p'}: cannot be read (Is a directory)")
    refused_here(capsys, ["predict", "--bundle", str(tmp_path / "g.json"), "--out", str(tmp_path / "o"),
                          str(images(tmp_path / "in", "a.png"))],
                 f"{tmp_path / 'g.json'} is not a bundle: a bundle is a folder")


def test_stop_signals_end_predict_as_ctrl_c_but_an_ignored_one_stays_ignored():
    import signal

    from medsapiens.io.processes import ended_like_ctrl_c

    term = signal.getsignal(signal.SIGTERM)
    hangup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
    try:
        with ended_like_ctrl_c():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # closing the terminal: nohup's choice holds
            with pytest.raises(KeyboardInterrupt):
                signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) == term  # as it was, after
    finally:
        signal.signal(signal.SIGHUP, hangup)
