import json

import numpy as np
import pytest

from medsapiens.evaluate.report import score_files, write_report
from medsapiens.evaluation.metrics import Protocol, radial_errors, summarize
from medsapiens.io import registry


def test_head_spacing_and_sdr_conventions():
    protocol = Protocol(registry.get("head"))
    gt = np.zeros((1, 19, 2))
    pred = gt.copy()
    pred[0, 0] = [30, 40]  # 50 px = 5 mm at 0.1 mm/px
    pred[0, 1] = [20, 0]  # exactly 2 mm: not counted by "<", counted by "<="
    factor = protocol.unit_per_pixel(gt[0], (0.1, 0.1), (1935, 2400))
    errors = radial_errors(pred, gt, factor[None])
    assert errors[0, 0] == pytest.approx(5.0) and errors[0, 1] == pytest.approx(2.0)
    strict = summarize(errors, (2.0, 4.0), "<")
    loose = summarize(errors, (2.0, 4.0), "<=")
    assert strict["sdr"]["2"] == pytest.approx(100 * 17 / 19)
    assert loose["sdr"]["2"] == pytest.approx(100 * 18 / 19)
    assert strict["mre"] == pytest.approx(7.0 / 19)


def test_an_error_a_rounding_away_from_a_radius_counts_as_on_it():
    """(18, 24) px at 0.1 mm is 3.0000000000000004 mm, (7, 24) px 2.5000000000000004: '<=' left both out."""
    gt = np.zeros((1, 19, 2))
    pred = np.tile(np.array([18.0, 24.0]), (1, 19, 1))
    pred[0, 1] = [7.0, 24.0]
    errors = radial_errors(pred, gt, np.full((1, 2), 0.1))
    assert errors[0, 0] > 3.0 and errors[0, 1] > 2.5  # what the float arithmetic gives
    assert summarize(errors, (2.5, 3.0), "<=")["sdr"] == {"2.5": pytest.approx(100 / 19), "3": 100.0}
    assert summarize(errors, (2.5, 3.0), "<")["sdr"] == {"2.5": 0.0, "3": pytest.approx(100 / 19)}
    assert summarize(errors[:, :1] * (1 - 1e-12), (3.0,), "<")["sdr"] == {"3": 0.0}  # a rounding below: on it


def test_hand_wrist_normalisation_default_and_gu2net_option():
    gt = np.zeros((37, 2))
    gt[1], gt[5] = [0, 0], [100, 0]  # wrist width 100 px -> 0.5 mm/px
    gt[0], gt[4] = [0, 0], [50, 0]  # GU2Net's pair: 50 px -> 1 mm/px
    pred = gt.copy()
    pred[10] += [6, 8]  # 10 px
    default = Protocol(registry.get("hand")).unit_per_pixel(gt, None, None)
    gu2net = Protocol(registry.get("hand"), wrist_landmarks=(0, 4)).unit_per_pixel(gt, None, None)
    assert radial_errors(pred[None], gt[None], default[None])[0, 10] == pytest.approx(5.0)
    assert radial_errors(pred[None], gt[None], gu2net[None])[0, 10] == pytest.approx(10.0)


def test_a_bundle_evaluation_leaves_out_a_hand_image_with_an_invisible_wrist_landmark():
    from medsapiens.evaluation.inference import SplitPredictions

    gt = np.zeros((37, 2))
    gt[1], gt[5] = [0, 0], [100, 0]  # wrist width 100 px -> 0.5 mm/px
    hidden = gt.copy()
    hidden[1] = [-40, 0]  # an invisible landmark keeps a position that means nothing
    preds = SplitPredictions(ids=["a", "b"], pred=[gt + [6, 8], hidden + [6, 8]], gt=[gt, hidden],
                             visible=[np.ones(37), np.r_[1, 0, np.ones(35)]], spacing=[None, None],
                             orig_size=[(200, 200)] * 2)
    protocol = Protocol(registry.get("hand"))
    errors, mask = preds.errors(protocol)
    assert mask[0].all() and not mask[1].any()  # measured in no unit rather than a wrong one
    assert errors[0] == pytest.approx(np.full(37, 5.0))
    assert preds.unscalable(protocol) == {"b": "wrist landmark 1 invisible: the hand protocol cannot scale its errors"}


def test_chest_512_frame_is_per_axis():
    protocol = Protocol(registry.get("chest"))
    gt = np.zeros((1, 6, 2))
    pred = gt.copy()
    pred[0, 0] = [2, 4]  # in a 1024 x 2048 image: (1, 1) px of the 512 x 512 frame
    factor = protocol.unit_per_pixel(gt[0], None, (1024, 2048))
    assert radial_errors(pred, gt, factor[None])[0, 0] == pytest.approx(np.sqrt(2))
    assert protocol.unit == "px"


def test_std_over_images_differs_from_std_over_landmarks():
    errors = np.array([[1.0, 3.0], [5.0, 7.0]])
    s = summarize(errors, (4.0,))
    assert s["mre"] == pytest.approx(4.0)
    assert s["mre_std_landmarks"] == pytest.approx(np.std([1, 3, 5, 7]))
    assert s["mre_std_images"] == pytest.approx(np.std([2.0, 6.0]))
    assert s["worst"][0] == {"id": "1", "mre": 6.0}
    assert s["per_landmark"]["1"]["mre"] == pytest.approx(5.0)


def test_mm_protocol_without_spacing_is_an_error_naming_the_image():
    with pytest.raises(ValueError, match="image L7: .* has no pixel spacing"):
        Protocol(registry.get("leg")).unit_per_pixel(np.zeros((26, 2)), None, (100, 100), "L7")


def test_a_pixel_protocol_ignores_spacing_some_images_have():
    spine = registry.custom("spine", ["a", "b"], unit="px")
    assert list(Protocol(spine).unit_per_pixel(np.zeros((2, 2)), (0.2, 0.2), (100, 100))) == [1.0, 1.0]


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_score_files_leg_spacing_and_report_files(tmp_path):
    gt_pts = np.random.default_rng(0).uniform(0, 500, size=(26, 2))
    pred_pts = gt_pts + [3.0, 4.0]  # 5 px everywhere
    gt = _write(tmp_path, "gt.json", {"dataset": "leg", "landmarks": {"a": gt_pts.tolist(), "b": gt_pts.tolist()},
                                      "spacing_mm": {"a": [0.1, 0.1], "b": [0.2, 0.2]}})
    pred = _write(tmp_path, "pred.json", {"dataset": "leg", "landmarks": {"a": pred_pts.tolist(), "b": gt_pts.tolist()}})
    report, errors, ids = score_files(pred, gt)
    assert ids == ["a", "b"]
    assert report["mre"] == pytest.approx(0.25)  # 0.5 mm on image a, 0 on image b
    assert report["mre_std_images"] == pytest.approx(0.25)
    assert report["sdr"]["2"] == 100.0 and report["unit"] == "mm"
    out = write_report(report, errors, ids, registry.get("leg").names, tmp_path / "out")
    saved = json.loads((out / "report.json").read_text())
    for key in ("mre", "mre_std_landmarks", "mre_std_images", "sdr", "per_landmark", "worst", "unit",
                "sdr_convention", "protocol"):
        assert key in saved
    rows = (out / "per_image.csv").read_text().splitlines()
    assert rows[1].startswith("a,0.5000") and len(rows) == 3
    assert "| 0.250 |" in (out / "report.md").read_text()


def test_score_files_refuses_missing_predictions_and_chest_without_size(tmp_path):
    pts = np.zeros((6, 2)).tolist()
    gt = _write(tmp_path, "gt.json", {"dataset": "chest", "landmarks": {"x": pts, "y": pts}})
    pred = _write(tmp_path, "pred.json", {"dataset": "chest", "landmarks": {"x": pts}})
    with pytest.raises(ValueError, match="without prediction.*'y'"):
        score_files(pred, gt)
    pred = _write(tmp_path, "pred.json", {"dataset": "chest", "landmarks": {"x": pts, "y": pts}})
    with pytest.raises(ValueError, match="image_size"):
        score_files(pred, gt)


def test_the_protocol_line_says_whether_a_spacing_was_applied():
    names = ("apex", "base")
    in_px, in_mm = registry.custom("knee", names, None, unit="px"), registry.custom("knee", names, None, unit="mm")
    gt, pred = np.zeros((2, 2)), np.array([[3.0, 4.0], [0.0, 0.0]])
    px = Protocol(in_px)
    assert radial_errors(pred[None], gt[None], px.unit_per_pixel(gt, (0.2, 0.2), None)[None])[0, 0] == 5.0
    assert px.description() == "errors in original pixels (this set is measured in pixels: no pixel spacing applied)"
    assert Protocol(in_mm).description() == "errors in original pixels times the pixel spacing, in mm"
