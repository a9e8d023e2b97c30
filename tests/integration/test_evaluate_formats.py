"""`evaluate --predictions/--ground-truth` on the files other tools write: our JSON, COCO keypoint
ground truth, COCO results; custom datasets; invisible landmarks left out and counted."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import CLI, refused_here, run

from medsapiens.evaluate.report import score_files
from medsapiens.io import registry

TRUTH = {"a": [[10.0, 10.0], [20.0, 30.0], [40.0, 40.0]], "b": [[5.0, 5.0], [15.0, 25.0], [35.0, 30.0]]}
GUESS = {"a": [[13.0, 14.0], [20.0, 30.0], [40.0, 46.0]], "b": [[5.0, 5.0], [15.0, 27.0], [0.0, 0.0]]}
ERRORS = {"a": [5.0, 0.0, 6.0], "b": [0.0, 2.0, None]}  # b's third landmark is invisible in the truth


def write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def coco_truth(spacing=None) -> dict:
    images, annotations = [], []
    for n, (image_id, points) in enumerate(TRUTH.items()):
        images.append({"id": 100 + n, "file_name": f"scans/{image_id}.dcm", "width": 64, "height": 64,
                       **({"spacing": spacing} if spacing else {})})
        v = [0 if ERRORS[image_id][k] is None else 2 for k in range(3)]
        annotations.append({"image_id": 100 + n, "keypoints": [c for p, vis in zip(points, v, strict=True) for c in (*p, vis)]})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "knee", "keypoints": ["medial", "lateral", "apex"]}]}


def expected_mre(scale: float = 1.0) -> float:
    return scale * float(np.mean([e for row in ERRORS.values() for e in row if e is not None]))


def test_custom_dataset_in_our_format_needs_no_landmark_set_key(tmp_path):
    truth = {"dataset": "knee", "landmarks": {**TRUTH, "b": [*TRUTH["b"][:2], None]}}
    pred = write(tmp_path / "p.json", {"dataset": "knee", "landmarks": GUESS})
    report, errors, ids = score_files(pred, write(tmp_path / "g.json", truth))
    assert report["unit"] == "px" and report["mre"] == pytest.approx(expected_mre())
    assert report["excluded_landmarks"] == 1 and report["landmarks"] == 5 and np.isnan(errors[1, 2])
    with_spacing = {**truth, "spacing_mm": {"a": [0.5, 0.5], "b": [0.5, 0.5]}}
    report, _, _ = score_files(pred, write(tmp_path / "g2.json", with_spacing))
    assert report["unit"] == "mm" and report["mre"] == pytest.approx(expected_mre(0.5))


def test_an_image_with_no_landmark_visible_is_left_out_and_named_not_counted(tmp_path):
    """Nothing of it is measured: counting it among the images scored would overstate the evaluation."""
    truth = {"dataset": "knee", "landmarks": {**TRUTH, "b": [*TRUTH["b"][:2], None], "c": [None, None, None]}}
    pred = write(tmp_path / "p.json", {"dataset": "knee", "landmarks": {**GUESS, "c": [[1.0, 1.0]] * 3}})
    report, errors, ids = score_files(pred, write(tmp_path / "g.json", truth))
    assert ids == ["a", "b", "c"] and np.isnan(errors[2]).all()
    assert report["images"] == 2 and report["excluded_landmarks"] == 1 and report["mre"] == pytest.approx(expected_mre())
    assert report["excluded_images"] == {"c": "no landmark visible in the ground truth: nothing to measure"}
    from medsapiens.evaluate.report import markdown

    assert "2 images, 5 landmarks (1 invisible in the ground truth, left out); 1 more image(s) left out" in markdown(report)
    assert "Left out: c: no landmark visible in the ground truth: nothing to measure." in markdown(report)


def test_coco_ground_truth_with_predict_output(tmp_path):
    """predict names images by file stem: the COCO file_name 'scans/a.dcm' is id 'a'."""
    pred = write(tmp_path / "p.json", {"dataset": "knee", "landmarks": GUESS})
    report, _, ids = score_files(pred, write(tmp_path / "g.json", coco_truth(spacing=[0.2, 0.2])))
    assert ids == ["a", "b"] and report["unit"] == "mm" and report["mre"] == pytest.approx(expected_mre(0.2))
    assert list(report["per_landmark"]) == ["medial", "lateral", "apex"] and report["excluded_landmarks"] == 1


@pytest.mark.parametrize("keypoint_score", [0.8, 0.0, -1.5])  # a score, not a visibility: any value is a prediction
def test_coco_results_against_coco_ground_truth(tmp_path, keypoint_score):
    results = [{"image_id": 100 + n, "category_id": 1, "score": 0.9,
                "keypoints": [c for p in GUESS[i] for c in (*p, keypoint_score)]} for n, i in enumerate(TRUTH)]
    report, _, _ = score_files(write(tmp_path / "r.json", results), write(tmp_path / "g.json", coco_truth()))
    assert report["unit"] == "px" and report["mre"] == pytest.approx(expected_mre())


def test_the_same_landmark_names_in_another_order_are_refused_as_duplicates_are(tmp_path):
    """Scored by position, a reordered list would score each landmark against another; a second entry
    for an image would replace the first unseen."""
    truth = write(tmp_path / "g.json", coco_truth())
    reordered = {"dataset": "knee", "landmarks": GUESS, "names": ["lateral", "medial", "tip"]}  # and one renamed
    with pytest.raises(ValueError, match="the predictions and the ground truth order the landmarks differently "
                                         "\\('lateral' is landmark 0 in the predictions, 1 in the ground truth\\)"):
        score_files(write(tmp_path / "p.json", reordered), truth)
    same = {**reordered, "names": ["medial", "lateral", "apex"]}
    assert score_files(write(tmp_path / "p.json", same), truth)[0]["mre"] == pytest.approx(expected_mre())
    head = {"dataset": "head", "landmarks": {"001": [[float(k), float(k)] for k in range(19)]},
            "names": list(reversed(registry.get("head").names))}
    with pytest.raises(ValueError, match="predictions and the registry's 'head' set order the landmarks differently"):
        score_files(write(tmp_path / "h.json", head), write(tmp_path / "hg.json", {**head, "names": None}))
    results = [{"image_id": 100 + n, "keypoints": [c for p in GUESS[i] for c in (*p, 0.8)]} for n, i in enumerate(TRUTH)]
    with pytest.raises(ValueError, match="predictions file .*r.json: image 100 has more than one result"):
        score_files(write(tmp_path / "r.json", [*results, results[0]]), truth)
    doubled = coco_truth()
    doubled["annotations"].append(doubled["annotations"][0])
    with pytest.raises(ValueError, match="ground-truth file .*g2.json: image 100 has more than one annotation"):
        score_files(write(tmp_path / "r.json", results), write(tmp_path / "g2.json", doubled))


def test_a_registry_dataset_keeps_its_protocol_and_a_missing_prediction_is_refused(tmp_path):
    truth = {"dataset": "head", "landmarks": {"001": [[float(k), float(k)] for k in range(19)]}}
    guess = {"dataset": "head", "landmarks": {"001": [[k + 3.0, k + 4.0] for k in range(19)]}}
    report, _, _ = score_files(write(tmp_path / "p.json", guess), write(tmp_path / "g.json", truth))
    assert report["unit"] == "mm" and report["mre"] == pytest.approx(0.5)  # 5 px at ISBI's 0.1 mm/px
    guess["landmarks"]["001"][3] = None
    with pytest.raises(ValueError, match="leave out landmarks the ground truth has"):
        score_files(write(tmp_path / "p2.json", guess), write(tmp_path / "g.json", truth))


def test_evaluate_cli_on_coco_files_writes_the_report(tmp_path, capsys):
    pred = write(tmp_path / "p.json", {"dataset": "knee", "landmarks": GUESS})
    out = tmp_path / "eval"
    proc = run([*CLI, "evaluate", "--predictions", pred, "--ground-truth", write(tmp_path / "g.json", coco_truth()),
                "--out", str(out)], 60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 invisible in the ground truth, left out" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["excluded_landmarks"] == 1
    refused_here(capsys, ["evaluate", "--predictions", pred, "--ground-truth", str(tmp_path / "g.json"), "--out", str(out)],
                 f"--out {out} holds an earlier report; give --overwrite")
    refused_here(capsys, ["evaluate", "--predictions", write(tmp_path / "bad.json", {"x": 1}), "--ground-truth",
                          str(tmp_path / "g.json"), "--out", str(out), "--overwrite"],
                 "bad.json: not a landmark file of a known format")
    assert (out / "report.json").is_file()  # a failed replacement keeps the earlier report


def test_hand_image_with_an_invisible_wrist_landmark_is_left_out_and_named(tmp_path):
    """The hand protocol scales errors by the wrist width: without both wrist landmarks an image has
    no scale, so it is left out and named, never scored in a wrong unit."""
    rng = np.random.default_rng(0)
    truth = {i: rng.uniform(50, 400, (37, 2)).round(1).tolist() for i in ("h1", "h2")}
    guess = {i: (np.array(p) + 3.0).tolist() for i, p in truth.items()}
    truth["h2"][5] = None  # wrist landmark 5 (Payer's pair is 1, 5) not visible
    truth["h1"][7] = None  # an invisible landmark of a scored image
    report, errors, ids = score_files(write(tmp_path / "p.json", {"dataset": "hand", "landmarks": guess}),
                                      write(tmp_path / "g.json", {"dataset": "hand", "landmarks": truth}))
    assert report["excluded_images"] == {"h2": "wrist landmark 5 invisible: the hand protocol cannot scale its errors"}
    assert (report["images"], report["landmarks"], report["excluded_landmarks"]) == (1, 36, 1)
    assert np.isnan(errors[1]).all() and np.isnan(errors[0, 7])
    width = np.linalg.norm(np.subtract(truth["h1"][1], truth["h1"][5]))
    assert report["mre"] == pytest.approx(np.hypot(3, 3) * 50 / width)
    out = tmp_path / "report"
    from medsapiens.evaluate.report import write_report
    write_report(report, errors, ids, [str(k) for k in range(37)], out)
    text = (out / "report.md").read_text()
    assert "1 images, 36 landmarks (1 invisible in the ground truth, left out); 1 more image(s) left out" in text
    assert "h2: wrist landmark 5 invisible" in text


@pytest.mark.parametrize("spacing", [[0, 0], [-0.2, 0.2], [float("nan"), 0.2], "12", [True, 1], [0.2], [[0.2], 0.2]])
def test_a_spacing_that_is_not_two_positive_numbers_is_refused_naming_the_image(tmp_path, spacing):
    from medsapiens.errors import InputError

    truth = {"dataset": "knee", "landmarks": TRUTH, "spacing_mm": {"a": [0.2, 0.2], "b": spacing}}
    gt, pred = write(tmp_path / "g.json", truth), write(tmp_path / "p.json", {"dataset": "knee", "landmarks": GUESS})
    with pytest.raises(InputError, match=r"image b: pixel spacing .* must be two positive finite numbers"):
        score_files(pred, gt)
    coco = coco_truth([0.0, 0.0])
    with pytest.raises(InputError, match="must be two positive finite numbers"):
        score_files(write(tmp_path / "p2.json", {"dataset": "knee", "landmarks": GUESS}), write(tmp_path / "g2.json", coco))


@pytest.mark.parametrize("landmarks, message", [
    ({"a": [["13", "14"], [20, 30], [40, 46]], "b": GUESS["b"]}, "image a, landmark 0: expected [x, y] (two finite numbers)"),
    ({"a": [[13, 14, 1], [20, 30], [40, 46]], "b": GUESS["b"]}, "image a, landmark 0: expected [x, y]"),
    ({"a": [[True, False], [20, 30], [40, 46]], "b": GUESS["b"]}, "image a, landmark 0: expected [x, y]"),
    ([1, 2], '"landmarks" must map each image id to its list of points'),
    ({"a": "13,14", "b": GUESS["b"]}, "image a: landmarks must be a list"),
])
def test_predictions_with_malformed_points_are_refused_in_one_line(tmp_path, landmarks, message):
    from medsapiens.errors import InputError

    gt = write(tmp_path / "g.json", {"dataset": "knee", "landmarks": TRUTH})
    pred = write(tmp_path / "p.json", {"dataset": "knee", "landmarks": landmarks})
    with pytest.raises(InputError, match=re.escape(message)):
        score_files(pred, gt)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_point_that_is_not_a_finite_number_is_refused_naming_its_file_image_and_landmark(tmp_path, value):
    """json writes NaN and Infinity, and reads them back: a NaN in the ground truth used to pass for an invisible
    landmark (left out of the MRE), an infinity for a diverged model's prediction."""
    from medsapiens.errors import InputError

    truth = {**TRUTH, "b": [[5.0, 5.0], [value, 25.0], [35.0, 30.0]]}
    guess = write(tmp_path / "p.json", {"dataset": "knee", "landmarks": GUESS})
    gt = write(tmp_path / "g.json", {"dataset": "knee", "landmarks": truth})
    with pytest.raises(InputError, match=re.escape(f"ground-truth file {gt}: image b, landmark 1: expected [x, y] (two "
                                                   f"finite numbers) or null (invisible), got [{value}, 25.0]")):
        score_files(guess, gt)
    coco = coco_truth()
    coco["annotations"][1]["keypoints"][4] = value
    with pytest.raises(InputError, match=re.escape(f"ground-truth file {tmp_path / 'c.json'}: image 101, landmark 1: "
                                                   f"keypoints must be finite numbers, got [15.0, {value}, 2.0]")):
        score_files(guess, write(tmp_path / "c.json", coco))
    coco["annotations"][1]["keypoints"][4] = 25.0
    coco["annotations"][1]["keypoints"][6:9] = [value, value, 0]  # b's invisible one: its x and y are not read
    assert score_files(guess, write(tmp_path / "c1.json", coco))[0]["excluded_landmarks"] == 1
    coco["annotations"][1]["keypoints"][8] = value
    with pytest.raises(InputError, match=re.escape("image 101, landmark 2: keypoints must be finite numbers")):
        score_files(guess, write(tmp_path / "c1.json", coco))
    results = [{"image_id": 100 + n, "category_id": 1, "keypoints": [c for p in GUESS[i] for c in (*p, 0.9)]}
               for n, i in enumerate(TRUTH)]
    results[0]["keypoints"][0] = value
    with pytest.raises(InputError, match=re.escape(f"predictions file {tmp_path / 'r.json'}: image 100, landmark 0")):
        score_files(write(tmp_path / "r.json", results), write(tmp_path / "c2.json", coco_truth()))


def test_a_misspelled_key_in_a_landmark_file_is_refused_naming_it(tmp_path):
    from medsapiens.errors import InputError

    gt = write(tmp_path / "g.json", {"datset": "knee", "landmarks": TRUTH})
    with pytest.raises(InputError, match=r"ground-truth file .*g.json: .*unknown key\(s\) datset; a landmark file has "
                                         r"dataset, landmarks, spacing_mm, image_size, names, landmark_set"):
        score_files(write(tmp_path / "p.json", {"dataset": "knee", "landmarks": GUESS}), gt)


def test_coverage_is_measured_only_with_the_wrist_pair_the_radii_were_calibrated_with(head_hand_bundle, phantom_shards,
                                                                                     tmp_path):
    """Hand radii are in mm scaled by the default wrist pair: errors scaled by another pair are in another
    unit, and their coverage would mean nothing."""
    from medsapiens.evaluate.evaluate import EvalOptions, evaluate_model
    from medsapiens.evaluation import conformal
    from medsapiens.io.manifest import load as load_manifest
    from medsapiens.model import bundle as bundlelib

    model, bundle = bundlelib.load(head_hand_bundle)
    names = bundle.landmark_sets["hand"].names
    bundle.calibration = {"hand": conformal.calibrate(np.ones((20, len(names))), np.ones((20, len(names)), bool), 0.9,
                                                      names, "mm", "val", False)}
    manifest = load_manifest(phantom_shards)
    default = evaluate_model(model, bundle, manifest, "hand", "test", tmp_path / "a", EvalOptions(flip_test=False))
    assert "coverage" in default and "coverage_not_measured" not in default
    gu2net = evaluate_model(model, bundle, manifest, "hand", "test", tmp_path / "b",
                            EvalOptions(flip_test=False, wrist_landmarks=(0, 4)))
    assert "coverage" not in gu2net
    assert gu2net["coverage_not_measured"] == ("the radii were calibrated on errors scaled by the default wrist "
                                               "landmarks (1, 5), this evaluation's by (0, 4)")
    assert "Coverage not measured: the radii were calibrated" in (tmp_path / "b" / "report.md").read_text()


def test_splits_joined_by_a_plus_are_scored_as_one(head_hand_bundle, phantom_shards, tmp_path):
    """ISBI 2015's Test1 and Test2 as one test set of 250 images, as GU2Net's loader tests."""
    from medsapiens.errors import InputError
    from medsapiens.evaluate.evaluate import EvalOptions, evaluate_model
    from medsapiens.io.manifest import ManifestError
    from medsapiens.io.manifest import load as load_manifest
    from medsapiens.model import bundle as bundlelib

    model, bundle = bundlelib.load(head_hand_bundle)
    manifest = load_manifest(phantom_shards)
    options = EvalOptions(flip_test=False, overlays=2)
    one, two, both = (evaluate_model(model, bundle, manifest, "head", split, tmp_path / split, options)
                      for split in ("test1", "test2", "test1+test2"))
    assert both["evaluated_on"] == "test1+test2" and both["per_image"] == {**one["per_image"], **two["per_image"]}
    assert both["images"] == one["images"] + two["images"] == manifest.datasets["head"].splits["test1"] + \
        manifest.datasets["head"].splits["test2"]
    pooled = (one["mre"] * one["landmarks"] + two["mre"] * two["landmarks"]) / (one["landmarks"] + two["landmarks"])
    assert both["mre"] == pytest.approx(pooled)
    assert len(list((tmp_path / "test1+test2" / "overlays").glob("*.png"))) == 2
    with pytest.raises(InputError, match=r"--split test1\+test1: name a split, or distinct splits joined by '\+'"):
        evaluate_model(model, bundle, manifest, "head", "test1+test1", tmp_path / "x", options)
    with pytest.raises(ManifestError, match="dataset 'head' has no 'tset2' samples"):
        evaluate_model(model, bundle, manifest, "head", "test1+tset2", tmp_path / "y", options)
