"""`medsapiens shards build`: rejection of every kind of bad input, determinism, resume, refusal,
and landmark / spacing accuracy through resizing."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from medsapiens.io.manifest import load
from medsapiens.io.record import Rejection, sample_key, to_original
from medsapiens.launch.cli import main
from medsapiens.shards.phantoms import write_phantoms


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantoms(tmp_path_factory.mktemp("phantoms"), n=5, seed=2)


def sources(roots) -> list[str]:
    return [arg for name, root in roots.items() for arg in ("--source", f"{name}={root}")]


def build(*args) -> int:
    return main(["shards", "build", "--no-progress", *map(str, args)])


def read_shards(out: Path) -> dict[str, dict]:
    """{key: {"json": record, "png": bytes}} over every shard in the manifest."""
    samples = {}
    for shard in load(out).shards:
        with tarfile.open(out / shard.url) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                samples.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data
    return samples


# ---------------------------------------------------------------- bad inputs
def png_bytes(size, seed=0) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def multi_frame_dicom(path: Path) -> None:
    """Two 32 x 32 frames in one DICOM file."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta, ds.SOPInstanceUID = meta, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 32, 32, 2, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        "MONOCHROME2", 8, 8, 7, 0)
    ds.PixelData = np.zeros((2, 32, 32), dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def bad_corpus(root: Path) -> Path:
    """A COCO set (K=2) with one input per rejection reason and two good ones."""
    root.mkdir(parents=True)
    multi_frame_dicom(root / "frames.dcm")
    good = png_bytes((40, 30))
    files = {"ok1.png": good, "a.b.png": good, "a-b.png": good, "garbage.png": b"not an image at all",
             "cut.png": png_bytes((200, 200))[:3000], "tiny.png": png_bytes((10, 10)), "far.png": good,
             "odd.png": good, "three.png": good, "nan.png": good, "spacing.png": good, "lonely.png": good}
    for name, data in files.items():
        (root / name).write_bytes(data)
    two = [5, 5, 2, 10, 10, 2]
    entries = [("ok1.png", two), ("garbage.png", two), ("cut.png", two), ("missing.png", two), ("lonely.png", None),
               ("odd.png", [5, 5, 2, 1, 1]), ("three.png", two + [1, 1, 2]), ("nan.png", [float("nan"), 5, 2, 1, 1, 2]),
               ("far.png", [500, 5, 2, 1, 1, 2]), ("ok1.png", two), ("a.b.png", two), ("a-b.png", two),
               ("spacing.png", two), ("tiny.png", [1, 1, 2, 2, 2, 2]), ("frames.dcm", two)]
    images = [{"id": i, "file_name": name, **({"spacing": [0, 1]} if name == "spacing.png" else {})}
              for i, (name, _) in enumerate(entries)]
    annotations = [{"image_id": i, "keypoints": kp} for i, (_, kp) in enumerate(entries) if kp is not None]
    (root / "bad_train_annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "keypoints": ["p", "q"]}]}))
    return root


def test_every_rejection_reason_is_reported_and_counted(tmp_path, capsys):
    corpus = bad_corpus(tmp_path / "bad")
    out = tmp_path / "out"
    assert build("--source", f"bad:coco={corpus}", "--out", out, "--max-side", 64, "--workers", 1) == 0
    printed = capsys.readouterr().out
    report = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted({r["reason"] for r in report}) == sorted(Rejection.REASONS)
    assert len(report) == 13 and all(r["dataset"] == "bad" and r["detail"] and r["source"] for r in report)
    assert {r["id"] for r in report if r["reason"] == "duplicate_id"} == {"ok1", "a-b"}
    split_of = {r["id"]: r["split"] for r in report}  # the split each would have been in (val carved from train)
    manifest = load(out)
    assert split_of["garbage"] == "val" and manifest.datasets["bad"].source["rejected_by_split"] == {
        "train": len(split_of) - 1, "val": 1}  # what an evaluation of each split tells
    assert (manifest.inputs, manifest.written, manifest.rejected) == (15, 2, 13)
    assert "inputs 15 = written 2 + rejected 13" in printed
    assert all(f"rejected {reason}: " in printed for reason in Rejection.REASONS)
    assert set(read_shards(out)) == {"bad_train_ok1", "bad_train_a-b"}


def test_strict_fails_after_writing_the_report(tmp_path, capsys):
    out = tmp_path / "out"
    assert build("--source", f"bad:coco={bad_corpus(tmp_path / 'bad')}", "--out", out, "--strict", "--workers", 1) == 1
    assert "--strict: 13 input(s) rejected" in capsys.readouterr().err
    assert len((out / "rejected.jsonl").read_text().splitlines()) == 13


def test_outside_invisible_keeps_the_sample_with_the_landmark_hidden(tmp_path):
    out = tmp_path / "out"
    assert build("--source", f"bad:coco={bad_corpus(tmp_path / 'bad')}", "--out", out, "--outside", "invisible",
                 "--workers", 1) == 0
    assert read_shards(out)["bad_train_far"]["json"]["visible"] == [0, 1]
    assert load(out).rejected == 12


# ---------------------------------------------------------------- phantoms: determinism, tar listing
def test_rebuild_is_byte_identical_and_tar_lists_key_pairs(phantoms, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert build(*sources(phantoms), "--out", one, "--max-side", 96, "--shard-size", 3, "--workers", 2) == 0
    assert build(*sources(phantoms), "--out", two, "--max-side", 96, "--shard-size", 3, "--workers", 1) == 0
    tars = sorted(p.name for p in one.glob("*.tar"))
    assert len(tars) >= 8 and tars == sorted(p.name for p in two.glob("*.tar"))
    assert all((one / t).read_bytes() == (two / t).read_bytes() for t in tars)
    assert (one / "manifest.json").read_bytes() == (two / "manifest.json").read_bytes()
    listed = subprocess.run(["tar", "-tf", str(one / "hand-train-000000.tar")], capture_output=True, text=True,
                            check=True).stdout.split()
    keys = sorted({name.split(".")[0] for name in listed})
    assert listed == [f"{k}.{ext}" for k in keys for ext in ("png", "json")]
    assert all(k.startswith("hand_train_") for k in keys)
    manifest = load(one)
    assert {d: info.splits for d, info in manifest.datasets.items()}["head"] == {"train": 1, "val": 1, "test1": 2,
                                                                                 "test2": 1}  # val carved
    assert manifest.build["max_side"] == 96 and manifest.datasets["hand"].source["options"]["split"] == "gu2net"
    assert manifest.datasets["leg"].source["spacing_from"] == {"meta.json spacing [sy, sx]": 5}


def test_rerun_skips_finished_shards_and_refuses_other_options(phantoms, tmp_path, capsys):
    out, args = tmp_path / "out", [*sources({"chest": phantoms["chest"]}), "--out", tmp_path / "out", "--workers", 1]
    assert build(*args, "--max-side", 64) == 0
    capsys.readouterr()
    assert build(*args, "--max-side", 64) == 0
    assert "(0 shard(s) written, 3 already complete)" in capsys.readouterr().out
    assert build(*args, "--max-side", 48) == 2  # not what was asked: --overwrite is
    assert "max_side: 64 -> 48" in capsys.readouterr().err and load(out).build["max_side"] == 64
    (out / "manifest.json").unlink()  # as after a killed build: only the stats files know the options
    assert build(*args, "--max-side", 48) == 2
    assert "max_side: 64 -> 48" in capsys.readouterr().err
    assert build(*args, "--max-side", 48, "--overwrite") == 0
    assert load(out).build["max_side"] == 48
    assert max(r["json"]["orig_size"][0] * r["json"]["scale"][0] for r in read_shards(out).values()) == 48
    (out / "manifest.json").unlink()  # an overwrite interrupted before its last shard: it resumes
    sorted(out.glob("*.stats.json"))[-1].unlink()
    capsys.readouterr()
    assert build(*args, "--max-side", 48, "--overwrite") == 0
    assert "(1 shard(s) written, 2 already complete)" in capsys.readouterr().out
    first = sorted(out.glob("*.tar"))[0]
    first.unlink()
    first.mkdir()  # the next build fails writing that shard, its first
    assert build(*args, "--max-side", 32, "--overwrite") == 1
    assert not (out / "manifest.json").exists()  # the 48 manifest would describe shards being replaced


def test_a_shard_deleted_or_cut_short_since_its_build_is_rewritten_by_a_rerun(phantoms, tmp_path, capsys):
    out = tmp_path / "out"
    args = [*sources({"chest": phantoms["chest"]}), "--out", out, "--workers", 1, "--max-side", 64]
    assert build(*args) == 0
    tars = sorted(out.glob("*.tar"))
    whole = {tar.name: tar.read_bytes() for tar in tars}
    tars[0].unlink()
    tars[1].write_bytes(whole[tars[1].name][: len(whole[tars[1].name]) // 2])
    capsys.readouterr()
    assert build(*args) == 0
    assert "(2 shard(s) written, 1 already complete)" in capsys.readouterr().out
    assert {tar.name: tar.read_bytes() for tar in sorted(out.glob("*.tar"))} == whole


def test_an_edited_image_redoes_only_its_shard(tmp_path, capsys):
    root = tmp_path / "leg"
    write_phantoms(tmp_path, n=4, seed=2, sets=["leg"])
    args = ["--source", f"leg={root}", "--out", tmp_path / "out", "--shard-size", 1, "--max-side", 64, "--workers", 1]
    assert build(*args) == 0
    image = root / "pngs" / "L0001.png"
    Image.open(image).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(image)
    capsys.readouterr()
    assert build(*args) == 0
    assert "(1 shard(s) written, 3 already complete)" in capsys.readouterr().out


# ---------------------------------------------------------------- kill -9 and resume
def test_build_killed_with_sigkill_resumes_without_losing_or_repeating_samples(tmp_path):
    roots = write_phantoms(tmp_path / "raw", n=10, seed=4)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medsapiens.launch.cli", "shards", "build", *sources(roots), "--out", str(out),
               "--shard-size", "1", "--workers", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list(out.glob("*.stats.json"))) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list(out.glob("*.stats.json")))
    assert 3 <= finished < 40 and not (out / "manifest.json").exists()
    rerun = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{40 - finished} shard(s) written, {finished} already complete" in rerun.stdout
    keys = [name.split(".")[0] for tar in out.glob("*.tar") for name in tarfile.open(tar).getnames()]
    assert len(keys) == 80 and len(set(keys)) == 40  # each key once, as png + json
    expected = {sample_key(s, split, i) for s, split, i in (
        (name, record["split"], record["source_id"]) for name in roots for record in
        (r["json"] for r in read_shards(out).values() if r["json"]["dataset"] == name))}
    assert set(keys) == expected and len(expected) == 40
    assert main(["shards", "verify", str(out)]) == 0


def live_processes_of_group(pgid: int) -> list[int]:
    import psutil

    alive = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_a_build_stopped_by_a_signal_starts_no_more_shards_and_leaves_no_process(tmp_path, signum):
    """Ctrl-C (SIGINT to the terminal's process group) or a plain `kill` of the build (SIGTERM to its
    process alone): the build ends in seconds with its workers, and no shard is begun after it."""
    roots = write_phantoms(tmp_path / "raw", n=10, seed=4)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medsapiens.launch.cli", "shards", "build", *sources(roots), "--out", str(out),
               "--shard-size", "1", "--workers", "2", "--no-progress"]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # as a terminal starts it:
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background job ignores SIGINT
    deadline = time.time() + 60
    while len(list(out.glob("*.stats.json"))) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    at_signal = len(list(out.glob("*.stats.json")))
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)
    else:
        os.kill(process.pid, signum)
    process.wait(30)
    deadline = time.time() + 15
    while live_processes_of_group(process.pid) and time.time() < deadline:
        time.sleep(0.1)
    left = live_processes_of_group(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    assert left == []
    written = len(list(out.glob("*.stats.json")))
    assert at_signal >= 3 and written - at_signal <= 4, (at_signal, written)  # the shards in hand at most, of 40
    assert not (out / "manifest.json").exists()


# ---------------------------------------------------------------- accuracy through resizing
def blob_dataset(root: Path, bits: int) -> tuple[Path, np.ndarray]:
    """A 1000x700 image with Gaussian blobs centred on known sub-pixel landmarks."""
    points = np.array([[123.3, 97.8], [640.6, 300.2], [901.1, 611.7], [455.5, 480.4]])
    ys, xs = np.mgrid[0:700, 0:1000]
    image = np.zeros((700, 1000))
    for x, y in points:
        image += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 9.0**2))
    top = 60000 if bits == 16 else 250
    Image.fromarray((500 * (bits == 16) + image * top).astype(np.uint16 if bits == 16 else np.uint8)).save(root / "b.png")
    keypoints = [v for x, y in points for v in (x, y, 2)]
    (root / "blobs_val_x.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "b.png", "width": 1000, "height": 700, "spacing": [0.2, 0.3]}],
        "annotations": [{"image_id": 1, "keypoints": keypoints}],
        "categories": [{"id": 1, "keypoints": ["a", "b", "c", "d"]}]}))
    return root, points


@pytest.mark.parametrize("bits", [8, 16])
def test_landmarks_and_spacing_survive_resizing(tmp_path, bits):
    root, points = blob_dataset(tmp_path, bits)
    out = tmp_path / "out"
    assert build("--source", f"blobs:coco={root}", "--out", out, "--max-side", 250, "--workers", 1) == 0
    sample = read_shards(out)["blobs_val_b"]
    record, stored = sample["json"], Image.open(io.BytesIO(sample["png"]))
    assert stored.size == (250, 175) and stored.mode == ("I;16" if bits == 16 else "L")
    pixels = np.asarray(stored).astype(np.float64)
    if bits == 16:
        assert pixels.max() > 255 * 50  # the 16-bit range is kept, not squeezed into 8 bits
    pixels -= np.median(pixels)
    ys, xs = np.mgrid[0:175, 0:250]
    for x, y in record["landmarks"]:
        window = (np.abs(xs - x) <= 8) & (np.abs(ys - y) <= 8)
        weights = np.clip(pixels, 0, None) * window
        centroid = (weights * xs).sum() / weights.sum(), (weights * ys).sum() / weights.sum()
        assert np.hypot(centroid[0] - x, centroid[1] - y) < 0.5
    np.testing.assert_allclose(to_original(record["landmarks"], record["scale"]), points, atol=1e-3)
    np.testing.assert_allclose(np.multiply(record["spacing_mm"], record["scale"]), [0.2, 0.3])
    assert record["orig_size"] == [1000, 700]


# ---------------------------------------------------------------- a set scored in mm, images without spacing
def aariz_dataset(root: Path) -> Path:
    """Two images per Aariz split folder, both annotators' files, no spacing table."""
    for folder, split in (("train", "t"), ("valid", "v"), ("test", "s")):
        for n in range(2):
            image_id = f"{split}{n}"
            (root / folder / "Cephalograms").mkdir(parents=True, exist_ok=True)
            (root / folder / "Cephalograms" / f"{image_id}.png").write_bytes(png_bytes((64, 48), n))
            marks = [{"landmark_id": k, "title": f"L{k}", "value": {"x": 10 + k, "y": 20}} for k in range(29)]
            for who in ("Senior Orthodontists", "Junior Orthodontists"):
                notes = root / folder / "Annotations" / "Cephalometric Landmarks" / who
                notes.mkdir(parents=True, exist_ok=True)
                (notes / f"{image_id}.json").write_text(json.dumps({"ceph_id": image_id, "landmarks": marks}))
    return root


def test_a_split_scored_in_mm_without_spacing_is_refused_before_training(tmp_path, capsys):
    from conftest import pretrain_args, refused_here

    root, out = aariz_dataset(tmp_path / "aariz"), tmp_path / "out"
    assert build("--source", f"aariz={root}", "--out", out, "--workers", 1) == 0
    assert load(out).datasets["aariz"].source["no_spacing_by_split"] == {"test": 2, "train": 2, "val": 2}
    assert "aariz is scored in mm, but images have no pixel spacing (test 2, train 2, val 2)" in capsys.readouterr().out
    refused_here(capsys, ["pretrain", "run", *pretrain_args(out, tmp_path / "run", "data.datasets=[aariz]")],
                 "2 of the 2 'val' images of dataset 'aariz' have no pixel spacing, and its errors are measured in mm")
    assert not (tmp_path / "run" / "config.yaml").exists()

    (root / "cephalogram_machine_mappings.csv").write_text(
        "cephalogram_id,machine,pixel_size\n" + "".join(f"{s}{n},A,0.1\n" for s in "tvs" for n in range(2)))
    assert build("--source", f"aariz={root}", "--out", tmp_path / "with_table", "--workers", 1) == 0
    assert "no_spacing_by_split" not in load(tmp_path / "with_table").datasets["aariz"].source
    assert "no pixel spacing" not in capsys.readouterr().out


def test_keypoints_renamed_in_a_coco_file_rewrite_the_shards_that_hold_the_old_names(tmp_path, capsys):
    root, out = tmp_path / "spine", tmp_path / "out"
    root.mkdir()
    names = ["a", "b", "c"]
    for n in range(4):
        (root / f"s{n}.png").write_bytes(png_bytes((32, 32), n))

    def annotations(names):
        (root / "spine_train.json").write_text(json.dumps({
            "images": [{"id": n, "file_name": f"s{n}.png"} for n in range(4)],
            "annotations": [{"image_id": n, "keypoints": [5, 5, 2, 10, 10, 2, 20, 20, 2]} for n in range(4)],
            "categories": [{"id": 1, "keypoints": names}]}))

    annotations(names)
    assert build("--source", f"spine:coco={root}", "--out", out, "--workers", 1) == 0
    annotations(["apex", "base", "tip"])  # only the names change: no option, no input file's pixels
    assert build("--source", f"spine:coco={root}", "--out", out, "--workers", 1) == 0
    assert "0 already complete" in capsys.readouterr().out
    assert main(["shards", "verify", str(out)]) == 0  # the records hold the names the manifest gives
    assert {tuple(s["json"]["names"]) for s in read_shards(out).values()} == {("apex", "base", "tip")}


@pytest.mark.parametrize("typo", ["s3:/bucket/shards", "S3://bucket/shards", "gs://bucket/shards"])
def test_a_url_that_is_not_s3_is_refused_not_made_a_local_folder(tmp_path, monkeypatch, capsys, typo):
    monkeypatch.chdir(tmp_path)
    root = write_phantoms(tmp_path / "raw", n=2, seed=0)["chest"]
    assert build("--source", f"chest={root}", "--out", typo) == 2
    assert capsys.readouterr().err.strip() == (f"error: {typo}: neither s3://BUCKET/PREFIX nor a local path (URLs are "
                                               "read and written on S3 only, spelled s3:// in lower case)")
    assert main(["shards", "verify", typo]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no folder named after the URL


def test_an_s3_url_without_a_bucket_is_refused(tmp_path, capsys):
    root = write_phantoms(tmp_path / "raw", n=2, seed=0)["chest"]
    for command in (["shards", "build", "--source", f"chest={root}", "--out", "s3://"], ["shards", "verify", "s3://"]):
        assert main(command) == 2
        assert capsys.readouterr().err.strip() == "error: s3://: names no bucket; give s3://BUCKET/PREFIX"
