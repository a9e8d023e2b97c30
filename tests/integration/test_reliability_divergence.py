"""A diverged model is an error, not a result: training stops at the first non-finite step naming it,
no checkpoint holds weights that step touched, and export, fine-tuning, evaluation and prediction
refuse weights that are not finite."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import CLI, DEMO_CONFIG, run
from safetensors.torch import load_file, save_file

from medsapiens.training import checkpoints


@pytest.mark.timeout(180)
def test_a_diverging_run_stops_at_that_step_and_keeps_only_finite_checkpoints(phantom_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "-m", "medsapiens.pretrain", "--config", str(DEMO_CONFIG), f"data.shards={phantom_shards}",
                f"run_dir={run_dir}", "data.micro_batch=4", "data.workers=0", "model.trunk_width=32",
                "train.max_steps=30", "train.checkpoint_every=1", "train.val_every=100", "optim.lr=1e6",
                "optim.warmup_steps=0"], 150)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: training diverged at step ") and "lower optim.lr (now 1e+06)" in error
    assert "start afresh (--resume none, or another run directory)" in error
    diverged = int(error.split("step ")[1].split(":")[0])
    tags = checkpoints.complete_tags(checkpoints.checkpoint_dir(run_dir))
    assert tags and max(checkpoints.tag_step(t) for t in tags) < diverged
    last = checkpoints.latest_tag(checkpoints.checkpoint_dir(run_dir))
    export = [*CLI, "pretrain", "export", str(run_dir), "--out", str(tmp_path / "bundle")]
    unfinished = run(export, 120)  # a run stopped short exports only on purpose
    assert unfinished.returncode == 2 and f"stopped at step {checkpoints.tag_step(last)} of 30" in unfinished.stderr
    assert f"export that checkpoint on purpose with --tag {last}" in unfinished.stderr
    exported = run([*export, "--tag", last], 120)
    assert exported.returncode == 0, exported.stderr[-2000:]  # the last checkpoint before the step is finite
    assert json.loads((tmp_path / "bundle" / "config.json").read_text())["provenance"]["finished"] is False


@pytest.mark.timeout(240)
def test_weights_that_are_not_finite_are_refused_by_every_stage(head_hand_bundle, phantom_shards, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(head_hand_bundle, bundle)
    weights = load_file(str(bundle / "model.safetensors"))
    weights["decoder.heads.head.weight"][0, 0] = float("nan")
    save_file(weights, str(bundle / "model.safetensors"))
    image = next((phantom_shards.parent / "raw" / "head" / "RawImage" / "Test1Data").glob("*.bmp"))
    for command in (["evaluate", "--bundle", str(bundle), "--shards", str(phantom_shards), "--dataset", "head",
                     "--split", "test1", "--out", str(tmp_path / "eval")],
                    ["predict", "--bundle", str(bundle), "--dataset", "head", "--out", str(tmp_path / "pred"),
                     str(image)],
                    ["finetune", "--bundle", str(bundle), "--shards", str(phantom_shards), "--dataset", "leg",
                     "--steps", "2", "--run-dir", str(tmp_path / "ft")]):
        proc = run([*CLI, *command], 120)
        assert proc.returncode == 2, (command[0], proc.stderr[-2000:])
        assert "weight 'decoder.heads.head.weight' is not finite" in proc.stderr and "Traceback" not in proc.stderr
    assert torch.isnan(load_file(str(bundle / "model.safetensors"))["decoder.heads.head.weight"]).any()


def test_predict_lists_a_non_finite_prediction_as_a_failure_and_flags_landmarks_outside(head_hand_bundle, phantom_shards,
                                                                                       tmp_path, monkeypatch):
    import json

    from medsapiens.evaluate.predict import PredictOptions, predict
    from medsapiens.evaluation.inference import BundleLandmarker

    real = BundleLandmarker.predict

    def faulty(self, images, dataset):  # as a model gone wrong on the first image, off the image on the second
        points, scores = real(self, images, dataset)
        points[0, 3] = np.nan
        points[1, 0] = (-40.0, 12.0)
        return points, scores

    monkeypatch.setattr(BundleLandmarker, "predict", faulty)
    images = sorted((phantom_shards.parent / "raw" / "head" / "RawImage" / "Test1Data").glob("*.bmp"))[:2]
    results, failures = predict([str(p) for p in images], tmp_path / "pred", PredictOptions("head"),
                                bundle_dir=str(head_hand_bundle))
    assert [f["reason"] for f in failures] == ["non_finite_prediction"] and failures[0]["image"] == str(images[0])
    assert [r["id"] for r in results] == [images[1].stem] and results[0]["outside_image"] == [results[0]["names"][0]]

    def no_nan(text):
        raise ValueError(f"{text} in strict JSON")

    for name in ("predictions.json", f"{images[1].stem}.json", "failures.json"):
        json.loads((tmp_path / "pred" / name).read_text(), parse_constant=no_nan)


@pytest.mark.parametrize("split", ["test1", "val"])  # evaluation, calibration
def test_evaluation_and_calibration_refuse_heatmaps_that_are_not_finite_naming_the_image(head_hand_bundle, phantom_shards,
                                                                                        tmp_path, monkeypatch, split):
    from medsapiens.errors import InputError
    from medsapiens.evaluate.evaluate import EvalOptions, calibrate_model, evaluate_model
    from medsapiens.evaluation import inference
    from medsapiens.io.manifest import load as load_manifest
    from medsapiens.model import bundle as bundlelib

    real = inference.predict_heatmaps
    poisoned = []

    def diverged_on_the_first_image(model, images, *args):  # finite weights, NaN heatmaps for one image
        heat = real(model, images, *args)
        if not poisoned:
            heat[0] = float("nan")
            poisoned.append(True)
        return heat

    monkeypatch.setattr(inference, "predict_heatmaps", diverged_on_the_first_image)
    model, bundle = bundlelib.load(head_hand_bundle)
    manifest = load_manifest(phantom_shards)
    with pytest.raises(InputError, match=r"NaN or infinity on 1 image\(s\) \(\d+\): no landmark to score") as refusal:
        if split == "val":
            calibrate_model(model, bundle, manifest, "head", split, 0.5, EvalOptions(flip_test=False))
        else:
            evaluate_model(model, bundle, manifest, "head", split, tmp_path / "eval", EvalOptions(flip_test=False))
    named = refusal.value.args[0].split("(")[2].split(")")[0]
    assert named in {p.stem for p in (phantom_shards.parent / "raw" / "head" / "RawImage").rglob("*.bmp")}
    assert not (tmp_path / "eval" / "report.json").exists()
