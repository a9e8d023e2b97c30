"""Deployment: ONNX export with decoding inside, predict on onnxruntime without torch, split conformal
radii (calibrated, stored, read back, covering held-out phantoms at the nominal level)."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLI, refused, refused_here, run

from medsapiens.data import preprocess
from medsapiens.data.augment import normalize, warp
from medsapiens.data.codec import decode_udp, heatmap_to_input, whole_image_affine
from medsapiens.data.pipeline import heatmap_size
from medsapiens.evaluation import conformal
from medsapiens.evaluation.inference import PredictSettings, predict_heatmaps, predict_split
from medsapiens.evaluation.metrics import Protocol
from medsapiens.io.imageio import decode, to_float
from medsapiens.io.manifest import load as load_manifest
from medsapiens.model import bundle as bundlelib

COVERAGE = 0.9
# The README's torch-free install (numpy pillow pydicom isal onnxruntime): importing any other package the full
# install brings fails in this interpreter; at exit no torch module may have been loaded
NOT_IN_THE_PREDICT_INSTALL = ("torch", "torchvision", "timm", "deepspeed", "webdataset", "boto3", "botocore", "tensorboard",
                              "safetensors", "yaml", "tqdm", "peft", "matplotlib")
WITHOUT_TORCH = (f"import sys; sys.modules.update(dict.fromkeys({NOT_IN_THE_PREDICT_INSTALL!r})); "
                 "from medsapiens.launch.cli import main; code = main(sys.argv[1:]); "
                 "loaded = [m for m, v in sys.modules.items() if m.split('.')[0] == 'torch' and v is not None]; "
                 "assert not loaded, loaded; sys.exit(code)")


def test_numpy_preprocessing_gives_the_pipelines_input():
    rng = np.random.default_rng(0)
    for size, channels in (((480, 600), 1), ((50, 40), 3), ((1500, 1100), 1)):
        image = rng.uniform(0, 255, (size[1], size[0], channels)[:2 if channels == 1 else 3]).astype(np.float32)
        for rotation in (12.0, 0.0):  # without rotation, the torch warp takes its separable path
            matrix = whole_image_affine(size, (96, 128), 1.25, 1.1, rotation, (0.02, -0.03), flip=True)
            expected = normalize(warp(image, matrix, (96, 128))).numpy()
            got = preprocess.normalize(preprocess.warp(image, matrix.numpy(), (96, 128)))
            assert got.shape == expected.shape == (3, 128, 96)
            assert np.abs(got - expected).max() < 0.01 / 57, (size, rotation)  # below 0.01 of a grey level


@pytest.fixture(scope="module")
def held_out_shards(tmp_path_factory) -> Path:
    """Head phantoms from another generator seed than the training ones, half the train split carved
    into val: 11 val, 22 test1, 16 test2 images the model never saw."""
    from medsapiens.shards.build import BuildOptions, build
    from medsapiens.shards.phantoms import write_phantoms
    from medsapiens.shards.plan import SourceSpec

    root = tmp_path_factory.mktemp("held_out")
    write_phantoms(root / "raw", n=60, seed=7, sets=("head",))
    build([SourceSpec("head", str(root / "raw" / "head"), options={"val_fraction": 0.5})],
          BuildOptions(out=str(root / "shards"), max_side=128, shard_size=16, workers=1, progress=False))
    return root / "shards"


@pytest.fixture(scope="module")
def calibrated(head_expert, held_out_shards, tmp_path_factory) -> Path:
    bundle = tmp_path_factory.mktemp("calibrated") / "bundle"
    shutil.copytree(head_expert / "bundle", bundle)
    proc = run([*CLI, "calibrate", str(bundle), "--shards", str(held_out_shards), "--coverage", str(COVERAGE)], 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "11 'val' images at 90% coverage" in proc.stdout
    return bundle


@pytest.fixture(scope="module")
def exported(calibrated, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "head.onnx"
    proc = run([*CLI, "export", "onnx", str(calibrated), "--out", str(out)], 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_head_images(phantom_shards) -> list[Path]:
    return sorted((phantom_shards.parent / "raw" / "head" / "RawImage" / "Test1Data").glob("*.bmp"))


@pytest.mark.timeout(400)
def test_onnx_graph_decodes_as_the_pytorch_bundle_at_any_batch(calibrated, exported, phantom_shards):
    from medsapiens.deploy.runtime import OnnxLandmarker

    model, bundle = bundlelib.load(calibrated)
    size, margin = bundle.input_size, bundle.codec.margin
    inputs = np.stack([preprocess.model_input(to_float(decode(str(p))), size, margin)[0]
                       for p in raw_head_images(phantom_shards)])
    assert len(inputs) >= 3
    heat = predict_heatmaps(model, torch.from_numpy(inputs), "head", 0, bundle.landmark_sets["head"].flip_permutation())
    keypoints, scores = decode_udp(heat, bundle.codec.blur_kernel)
    expected = heatmap_to_input(keypoints, size, heatmap_size(size)).numpy()
    onnx_model = OnnxLandmarker(exported)
    for batch in (inputs[:1], inputs):  # the batch dimension is dynamic
        landmarks, onnx_scores = onnx_model.run_inputs(batch, "head")
        assert landmarks.shape == (len(batch), 19, 2)
        assert np.abs(landmarks - expected[:len(batch)]).max() < 0.05  # input pixels
        assert np.abs(onnx_scores - scores[:len(batch)].numpy()).max() < 1e-4
    meta = onnx_model.meta
    assert meta["heads"] == {"head": 19} and meta["input"]["size"] == [96, 128]
    assert meta["landmark_sets"]["head"]["names"] == list(bundle.landmark_sets["head"].names)
    assert meta["codec"]["blur_kernel"] == bundle.codec.blur_kernel and meta["flip_test"] == {"head": True}
    assert "whole-image affine" in meta["input"]["preprocessing"] and meta["input"]["margin"] == margin
    assert meta["calibration"]["head"]["radii"] == bundle.calibration["head"]["radii"]


@pytest.mark.timeout(300)
def test_predict_onnx_needs_no_torch_and_writes_what_predict_writes(calibrated, exported, phantom_shards, tmp_path):
    folder = phantom_shards.parent / "raw" / "head" / "RawImage" / "Test1Data"
    proc = run([sys.executable, "-c", WITHOUT_TORCH, "predict", "--onnx", str(exported),
                "--out", str(tmp_path / "onnx"), "--overlays", str(folder)], 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run([*CLI, "predict", "--bundle", str(calibrated), "--out", str(tmp_path / "torch"), str(folder)],
               120).returncode == 0
    for image in raw_head_images(phantom_shards):
        onnx_result, torch_result = (json.loads((tmp_path / side / f"{image.stem}.json").read_text())
                                     for side in ("onnx", "torch"))
        assert set(onnx_result) == set(torch_result)
        scale = float(np.sqrt(abs(np.linalg.det(whole_image_affine(onnx_result["size"], (96, 128))[:2, :2]))))
        gap = np.abs(np.array(onnx_result["landmarks"]) - torch_result["landmarks"]).max()
        assert gap < 0.05 / scale, (gap, scale)  # 0.05 input px, in original pixels
        assert np.abs(np.array(onnx_result["scores"]) - torch_result["scores"]).max() <= 2e-4  # rounded to 1e-4
        assert onnx_result["radius"] == torch_result["radius"] and onnx_result["radius_unit"] == "mm"
        # head phantoms are 0.1 mm/px: the radius in pixels is ten times the radius in mm
        assert np.allclose(onnx_result["radius_px"], np.array(onnx_result["radius"])[:, None] / 0.1, rtol=1e-3)
        assert (tmp_path / "onnx" / "overlays" / f"{image.stem}.png").stat().st_size > 0
    onnx_ids = json.loads((tmp_path / "onnx" / "predictions.json").read_text())["landmarks"]
    assert set(onnx_ids) == {p.stem for p in raw_head_images(phantom_shards)}


def test_predict_onnx_refuses_a_flip_setting_the_model_was_not_exported_with(exported, phantom_shards, tmp_path):
    proc = run([*CLI, "predict", "--onnx", str(exported), "--no-flip-test", "--out", str(tmp_path),
                str(raw_head_images(phantom_shards)[0])], 60)
    assert proc.returncode == 2 and "exported with flip test" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_onnx_given_a_bundle_folder_says_where_a_bundle_goes(head_expert, phantom_shards, tmp_path):
    proc = run([*CLI, "predict", "--onnx", str(head_expert / "bundle"), "--out", str(tmp_path),
                str(raw_head_images(phantom_shards)[0])], 60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: --onnx {head_expert / 'bundle'} is a folder, not an ONNX file: a model bundle goes to --bundle, and "
        "`medsapiens export onnx BUNDLE --out FILE.onnx` makes the file --onnx takes")


def test_split_conformal_coverage_meets_its_finite_sample_bounds_on_exchangeable_errors():
    rng = np.random.default_rng(0)
    for n in (10, 19, 30):
        k = conformal.rank_of(n, COVERAGE)
        calibration = rng.gamma(2.0, 1.0, (4000, n))
        radii = np.array([conformal.radius(row, COVERAGE) for row in calibration])
        fresh = rng.gamma(2.0, 1.0, (4000, 50))
        covered = (fresh <= radii[:, None]).mean()
        # E[coverage] = k / (n + 1) exactly for continuous errors: within [1 - alpha, 1 - alpha + 1 / (n + 1)]
        assert covered == pytest.approx(k / (n + 1), abs=0.006), n
        assert COVERAGE - 0.006 <= covered <= COVERAGE + 1 / (n + 1) + 0.006
    with pytest.raises(ValueError, match="at least 9"):
        conformal.radius(np.ones(8), COVERAGE)


def test_a_landmark_visible_in_too_few_calibration_images_is_named_and_images_seeing_none_are_not_counted():
    errors, mask = np.ones((12, 3)), np.ones((12, 3), dtype=bool)
    mask[:6, 2] = False  # landmark c visible in 6 of the 12 images, 9 needed at 90%
    with pytest.raises(conformal.TooFewToCalibrate, match=r"^'val': landmark\(s\) c \(6\) visible in too few images "
                       r"to calibrate at 90% coverage: at least 9 are needed$"):
        conformal.calibrate(errors, mask, COVERAGE, ["a", "b", "c"], "mm", "val", True)
    mask[:3, 2] = True
    assert conformal.calibrate(errors, mask, COVERAGE, ["a", "b", "c"], "mm", "val", True)["n"] == [12, 12, 9]
    record = conformal.calibrate(np.ones((13, 3)), np.vstack([mask, np.zeros((1, 3), dtype=bool)]), COVERAGE,
                                 ["a", "b", "c"], "mm", "val", True)
    assert (record["images"], record["n"]) == (12, [12, 12, 9])  # an image with nothing visible is not counted


def split_errors(bundle_dir, shards, split) -> np.ndarray:
    model, bundle = bundlelib.load(bundle_dir)
    manifest = load_manifest(shards)
    preds = predict_split(model, manifest, "head", 0, split, PredictSettings.of_bundle(model, bundle, "cpu", 8, True))
    errors, mask = preds.errors(Protocol(manifest.landmark_set("head")))
    assert mask.all()
    return errors


@pytest.mark.timeout(300)
def test_conformal_radii_cover_held_out_phantoms_at_the_nominal_level_across_seeds(calibrated, held_out_shards):
    pool = np.concatenate([split_errors(calibrated, held_out_shards, s) for s in ("val", "test1", "test2")])
    assert pool.shape == (49, 19)
    n = 20
    for coverage in (0.8, COVERAGE):
        overall, per_landmark = [], []
        for seed in range(40):  # 40 random calibration/test splits of the held-out images
            order = np.random.default_rng(seed).permutation(len(pool))
            cal, test = pool[order[:n]], pool[order[n:]]
            radii = [conformal.radius(cal[:, k], coverage) for k in range(cal.shape[1])]
            total, each = conformal.coverage_of(test, np.ones_like(test, dtype=bool), radii)
            overall.append(total)
            per_landmark.append(each)
        mean = float(np.mean(overall))
        assert coverage - 0.03 <= mean <= coverage + 1 / (n + 1) + 0.03, (coverage, mean)
        assert np.mean(per_landmark, axis=0).min() >= coverage - 0.1, np.mean(per_landmark, axis=0)


@pytest.mark.timeout(300)
def test_calibration_is_stored_read_back_and_reported_by_evaluate(calibrated, held_out_shards, tmp_path):
    stored = bundlelib.read_config(calibrated).calibration["head"]
    expected = conformal.calibrate(split_errors(calibrated, held_out_shards, "val"), np.ones((11, 19), bool), COVERAGE,
                                   stored["names"], "mm", "val", True)
    manifest = held_out_shards / "manifest.json"
    assert stored == {**expected, "shards": {"location": str(held_out_shards.resolve()), "sha256": sha256_of(manifest)}}
    assert stored["images"] == 11 and stored["unit"] == "mm" and stored["split"] == "val"
    out = tmp_path / "eval"
    proc = run([*CLI, "evaluate", "--bundle", str(calibrated), "--shards", str(held_out_shards), "--split", "test1",
                "--out", str(out)], 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    errors = np.loadtxt(out / "per_image.csv", delimiter=",", skiprows=1, usecols=range(2, 21))
    inside = errors <= np.array(stored["radii"]) + 5e-5  # per_image.csv rounds to 1e-4
    assert report["coverage"]["overall"] == pytest.approx(inside.mean(), abs=1 / inside.size)
    assert report["coverage"]["nominal"] == COVERAGE and report["coverage"]["calibrated_on"] == "val"
    assert report["coverage"]["held_out"] is True  # test1, not the val split it was calibrated on
    assert abs(report["coverage"]["overall"] - COVERAGE) < 0.12  # one split of 22 images; the seeds test is tighter
    assert "Conformal error bounds" in (out / "report.md").read_text() and "conformal coverage" in proc.stdout
    assert (f"calibrated on the 'val' split (11 images of the shards at `{held_out_shards.resolve()}`, manifest sha256 "
            f"{sha256_of(manifest)[:12]})") in (out / "report.md").read_text()
    assert report["annotations"]["reader"] == "isbi2015" and report["annotations"]["options"]["gt"] == "mean"
    assert "Ground truth and split as the shards' `isbi2015` reader read them, with gt=mean" in (out / "report.md").read_text()


def test_export_onnx_without_the_onnx_extra_is_one_line_with_the_install_hint(head_expert, tmp_path):
    proc = run([sys.executable, "-c", "import sys; sys.modules['onnxscript'] = None; from medsapiens.launch.cli import main; "
                "sys.exit(main(sys.argv[1:]))", "export", "onnx", str(head_expert / "bundle"),
                "--out", str(tmp_path / "m.onnx")], 120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: export onnx needs onnxscript: pip install 'medsapiens[onnx]'"
    assert "Traceback" not in proc.stderr and not (tmp_path / "m.onnx").exists()


def test_calibration_refuses_a_test_split_the_training_split_and_too_few_images(head_expert, phantom_shards, tmp_path,
                                                                                capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(head_expert / "bundle", bundle)
    calibrate = ["calibrate", str(bundle), "--shards", str(phantom_shards)]
    refused([*calibrate, "--split", "test1"], "is a test split")
    refused_here(capsys, [*calibrate, "--split", "train"], "calibration split 'train' is the split this bundle trained on")
    refused_here(capsys, calibrate, "at least 9 are needed", "--opt head.val_fraction=F")  # 1 val image
    # a bundle without calibration (as every older bundle) loads, with no radii
    assert bundlelib.read_config(bundle).calibration == {}
    assert "calibration" not in json.loads((bundle / "config.json").read_text())


def test_finetune_calibrates_the_bundle_it_selected_on_its_val_split(head_expert, held_out_shards, phantom_shards,
                                                                     tmp_path, capsys):
    from medsapiens.finetune.config import FinetuneConfig
    from medsapiens.finetune.train import calibrate_run

    for shards, val_images in ((held_out_shards, 11), (phantom_shards, 1)):
        run_dir = tmp_path / f"val{val_images}"
        shutil.copytree(head_expert / "bundle", run_dir / "bundle")
        model, bundle = bundlelib.load(run_dir / "bundle")
        calibrate_run(FinetuneConfig(run_dir=str(run_dir), dataset="head"), model, bundle, load_manifest(shards), "cpu")
        stored = bundlelib.read_config(run_dir / "bundle").calibration
        if val_images >= conformal.minimum_images(COVERAGE):
            assert stored["head"]["split"] == "val" and stored["head"]["images"] == val_images
            assert stored["head"]["coverage"] == COVERAGE and len(stored["head"]["radii"]) == 19
        else:
            err = capsys.readouterr().err
            assert stored == {} and "calibration skipped: 1 'val' image(s) of head are too few to calibrate at 90% " \
                "coverage: at least 9 are needed; rebuild the shards with a larger val split " \
                "(--opt head.val_fraction=F)" in err
