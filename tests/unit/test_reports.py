"""Report figures (CED curve, per-landmark MRE), the demo's one-figure CED of the starts and its folder, and
`evaluate --compare`."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import CLI, refused_here, run
from PIL import Image

from medsapiens.errors import UserError
from medsapiens.evaluate.figures import ced_curve
from medsapiens.evaluate.report import build_report, write_report
from medsapiens.evaluation.metrics import Protocol
from medsapiens.io import registry
from medsapiens.launch.demo import DemoPlan, claim_out, starts_figure, table

IDS = [f"img{i:02d}" for i in range(12)]


def write_scored(out, errors: np.ndarray, dataset: str = "head", ids=tuple(IDS), spacing: float = 0.1, mask=None):
    """report.json, report.md, per_image.csv and figures of given (N, K) errors."""
    protocol = Protocol(registry.get(dataset))
    mask = np.ones_like(errors, dtype=bool) if mask is None else mask
    report = build_report(errors, mask, list(ids), protocol, dataset, "synthetic errors", np.full((len(ids), 2), spacing))
    write_report(report, np.where(mask, errors, np.nan), list(ids), protocol.landmark_set.names, out)
    return report


def errors_of(seed: int, scale: float, dataset: str = "head") -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, scale, (len(IDS), registry.get(dataset).num_landmarks))


def looks_like_a_figure(path) -> None:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert min(pixels.shape) > 200 and pixels.std() > 10, path  # drawn on, not a blank canvas


def test_report_has_its_cumulative_error_curve_and_per_landmark_bars(tmp_path):
    errors = errors_of(0, 1.0)
    write_scored(tmp_path, errors)
    for name in ("ced.png", "per_landmark_mre.png"):
        looks_like_a_figure(tmp_path / name)
        assert f"]({name})" in (tmp_path / "report.md").read_text()
    x, y = ced_curve(errors)
    assert np.all(np.diff(x) >= 0) and y[-1] == 1.0
    assert y[np.searchsorted(x, 2.0, side="right") - 1] == pytest.approx((errors <= 2.0).mean())


def test_demo_tables_and_draws_the_seed_summaries_fine_tuning_writes(tmp_path):
    from medsapiens.finetune.train import FinetuneResult, seed_summary

    results = {}
    for n, (name, scale) in enumerate((("pretrained", 0.6), ("same backbone", 1.0), ("scratch", 1.2))):
        runs = []
        for seed in range(2):
            run_dir = tmp_path / f"start{n}" / f"seed_{seed}"
            report = write_scored(run_dir / "eval" / "test", errors_of(10 * n + seed, scale * 3, "leg"), "leg")
            runs.append(FinetuneResult(str(run_dir), str(run_dir / "bundle"), seed, None, 0, {"test": report}))
        results[name] = json.loads(json.dumps(seed_summary(runs)))  # as the demo reads summary.json back
    plan = DemoPlan(out=tmp_path, seeds=(0, 1))
    rows = table_rows(table(plan, results), "scratch")
    scratch = results["scratch"]["splits"]["test"]
    assert rows[0][1] == f"{scratch['mre']['mean']:.2f} ± {scratch['mre']['std']:.2f}"
    assert "leg test, 2 seeds" in table(plan, results).splitlines()[0]
    path = starts_figure(plan, results)
    assert path == tmp_path / "ced_starts.png"
    looks_like_a_figure(path)


def test_demo_folder_holds_one_demo(tmp_path):
    """A rerun skips finished stages, so other settings in the same folder would mix two runs' tables."""
    claim_out(DemoPlan(out=tmp_path, arch="sapiens2_tiny"))
    claim_out(DemoPlan(out=tmp_path, arch="sapiens2_tiny"))
    with pytest.raises(UserError, match="holds a demo made with other settings: arch sapiens2_tiny "
                                        r"\(now sapiens_tiny\); pass --fresh"):
        claim_out(DemoPlan(out=tmp_path))
    with pytest.raises(UserError, match=r"held_out leg \(now hand\), finetune_steps 120 \(now 200\)"):
        claim_out(DemoPlan(out=tmp_path, arch="sapiens2_tiny", held_out="hand", finetune_steps=200))
    (tmp_path / "demo.json").unlink()  # a demo from before the marker is the default arch's
    (tmp_path / "sapiens_tiny_init.safetensors").touch()
    with pytest.raises(UserError, match=r"arch sapiens_tiny \(now sapiens2_tiny\)"):
        claim_out(DemoPlan(out=tmp_path, arch="sapiens2_tiny"))
    claim_out(DemoPlan(out=tmp_path, pretrain_steps=1500))
    assert json.loads((tmp_path / "demo.json").read_text()) == {
        "arch": "sapiens_tiny", "held_out": "leg", "ranks": 2, "pretrain_steps": 1500, "finetune_steps": 120}
    with pytest.raises(UserError, match=r"pretrain_steps 1500 \(now 800\)"):
        claim_out(DemoPlan(out=tmp_path))
    # the configs' step counts, given or not, and a marker from before they were written resolved: one demo
    (tmp_path / "demo.json").write_text(json.dumps({"arch": "sapiens_tiny", "held_out": "leg", "ranks": 2,
                                                    "pretrain_steps": None, "finetune_steps": None}))
    claim_out(DemoPlan(out=tmp_path, pretrain_steps=800, finetune_steps=120))
    claim_out(DemoPlan(out=tmp_path))


def test_the_demo_never_writes_into_or_deletes_a_folder_of_other_files(tmp_path, capsys):
    from medsapiens.launch.cli import main

    victim = tmp_path / "victim"
    (victim / "thesis").mkdir(parents=True)
    (victim / "thesis" / "chapter1.tex").write_text("work")
    for argv in (["--fresh"], []):
        assert main(["demo", *argv, "--out", str(victim)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: --out {victim} holds files and no demo (demo.json); the demo writes, and --fresh deletes, only a "
            "folder of its own: choose another --out")
    assert (victim / "thesis" / "chapter1.tex").read_text() == "work" and sorted(victim.iterdir()) == [victim / "thesis"]
    (tmp_path / "notes.txt").write_text("notes")
    assert main(["demo", "--fresh", "--out", str(tmp_path / "notes.txt")]) == 2
    assert "is a file; the demo needs a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "notes"


def test_demo_steps_reach_the_stage_commands(tmp_path, monkeypatch):
    """--pretrain-steps and --finetune-steps become train.max_steps of those stages' commands; without
    them the experiment configs decide; a finished fine-tuning start is not run again."""
    import medsapiens.launch.demo as demo

    commands = []

    def finish(cmd):
        commands.append(cmd)
        if "--run-dir" in cmd:
            run_dir = Path(cmd[cmd.index("--run-dir") + 1])
            run_dir.mkdir(parents=True)
            (run_dir / "summary.json").write_text(json.dumps({"splits": {}}))

    monkeypatch.setattr(demo, "run", finish)
    shards, init = tmp_path / "shards", tmp_path / "init.safetensors"
    demo.pretrain(DemoPlan(out=tmp_path, pretrain_steps=1500), shards, init)
    demo.finetune(DemoPlan(out=tmp_path, finetune_steps=200), shards, tmp_path / "bundle", init, "bundle")
    demo.finetune(DemoPlan(out=tmp_path, finetune_steps=200), shards, tmp_path / "bundle", init, "bundle")
    demo.finetune(DemoPlan(out=tmp_path), shards, tmp_path / "bundle", init, "scratch")
    launch_pretrain, export, finetune_bundle, finetune_scratch = commands
    assert "train.max_steps=1500" in launch_pretrain and "train.max_steps=200" in finetune_bundle
    assert "export" in export
    assert not any(arg.startswith("train.max_steps") for arg in finetune_scratch)


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if re.match(rf"\|\s*{first_cell}\s*\|", line)]


def test_compare_prints_the_reports_values_and_a_paired_test(tmp_path):
    a = write_scored(tmp_path / "a", errors_of(0, 1.0))
    b = write_scored(tmp_path / "b", errors_of(0, 1.0) * 1.3)  # worse on every image
    proc = run([*CLI, "evaluate", "--compare", str(tmp_path / "a" / "report.json"), str(tmp_path / "b" / "report.json"),
                str(tmp_path / "a" / "report.json"), "--out", str(tmp_path / "cmp")], 60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert text == (tmp_path / "cmp" / "compare.md").read_text() + "\n"
    for n, report in ((0, a), (1, b), (2, a)):
        row = table_rows(text, str(n))[0]
        assert row[2] == "n/a" and row[3] == str(report["images"])  # score files name no split
        assert [float(v) for v in row[4:7]] == [round(report[k], 3) for k in ("mre", "mre_std_landmarks",
                                                                                  "mre_std_images")]
        assert [float(v) for v in row[7:]] == [round(report["sdr"][r], 2) for r in ("2", "2.5", "3", "4")]
    tests = json.loads((tmp_path / "cmp" / "compare.json").read_text())["paired"]
    # all 12 image differences positive: the exact sign-flip p is 2 / 2^12; no difference: p = 1
    assert tests[0]["p"] == pytest.approx(2 / 2**12) and tests[0]["worse"] == 12
    assert tests[1]["p"] == 1.0 and tests[1]["mean_difference"] == 0.0
    first = next(iter(a["per_landmark"]))
    landmark = table_rows(text, first)[0]
    delta = b["per_landmark"][first]["mre"] - a["per_landmark"][first]["mre"]
    assert float(landmark[3]) == round(delta, 3) and float(landmark[1]) == round(a["per_landmark"][first]["mre"], 3)


def test_compare_refuses_reports_on_another_ground_truth_but_not_on_another_val_carving(tmp_path, capsys):
    from medsapiens.launch.cli import main

    def scored(name: str, options: dict) -> str:
        write_scored(tmp_path / name, errors_of(0, 1.0))
        path = tmp_path / name / "report.json"
        report = json.loads(path.read_text())
        report["annotations"] = {"reader": "isbi2015", "options": options}
        path.write_text(json.dumps(report))
        return str(path)

    mean = scored("mean", {"gt": "mean", "val": "seeded", "val_seed": "0"})
    other_val = scored("other_val", {"gt": "mean", "val": "gu2net", "val_seed": "3"})
    senior = scored("senior", {"gt": "senior", "val": "seeded", "val_seed": "0"})
    assert main(["evaluate", "--compare", mean, other_val, "--out", str(tmp_path / "cmp")]) == 0
    capsys.readouterr()
    refused_here(capsys, ["evaluate", "--compare", mean, senior, "--out", str(tmp_path / "cmp2")],
                 "the reports were measured on shards read with other ground truth or test images "
                 "(isbi2015 reader with gt=mean; isbi2015 reader with gt=senior): not comparable")


def test_compare_takes_a_report_naming_the_spacing_rule_as_reports_did_before(tmp_path, capsys):
    from medsapiens.evaluate.compare import SPACING_RULE_LINE_BEFORE, comparison

    old, new = (write_scored(tmp_path / name, errors_of(0, 1.0)) for name in ("old", "new"))
    assert new["protocol"] == "errors in original pixels times the pixel spacing, in mm"
    path = tmp_path / "old" / "report.json"
    path.write_text(json.dumps({**old, "protocol": SPACING_RULE_LINE_BEFORE}))
    assert comparison([path, tmp_path / "new" / "report.json"])["paired"][0]["p"] == 1.0


def test_compare_refuses_reports_of_other_images_or_other_pixel_spacings(tmp_path, capsys):
    """Rows of different test images were printed as equals, their paired test run on the images in common; and
    reports whose images another spacing table had scaled compared as if measured alike."""
    write_scored(tmp_path / "a", errors_of(0, 1.0))
    write_scored(tmp_path / "b", errors_of(0, 1.0), ids=(*IDS[:10], "x1", "x2"))
    write_scored(tmp_path / "c", errors_of(0, 1.0), spacing=0.11)
    a, b, c = (str(tmp_path / name / "report.json") for name in "abc")
    refused_here(capsys, ["evaluate", "--compare", a, b],
                 f"{a} and {b} scored other images (12 and 12, 10 in common; e.g. img10, img11, x1 in one only): "
                 "their numbers are not comparable")
    refused_here(capsys, ["evaluate", "--compare", a, c],
                 "the reports converted the same images' errors with other pixel spacings")
    # a wrist width comes from the ground truth, which `annotations` compares; rounded in shards, it differs in the
    # 6th digit from the original file's: no digest
    assert "scales_digest" not in write_scored(tmp_path / "h", errors_of(0, 1.0, "hand"), "hand", spacing=0.3)


def test_compare_counts_a_difference_under_a_thousandth_of_the_unit_as_a_tie(tmp_path):
    """The same predictions scored twice, once through predict's landmarks rounded to 0.001 px, were 'better' on
    most images with p 0.01."""
    from medsapiens.evaluate.compare import comparison, markdown

    errors = errors_of(0, 1.0)
    write_scored(tmp_path / "a", errors)
    write_scored(tmp_path / "b", errors + np.where(np.arange(len(IDS)) < 10, -2e-5, 1e-5)[:, None])
    write_scored(tmp_path / "c", errors + 0.01)
    same, worse = comparison([tmp_path / name / "report.json" for name in "abc"])["paired"]
    assert (same["better"], same["worse"], same["mean_difference"], same["p"]) == (0, 0, 0.0, 1.0)
    assert worse["worse"] == 12 and worse["p"] == pytest.approx(2 / 2**12)
    assert "| std over all errors |" in markdown(comparison([tmp_path / "a" / "report.json"] * 2))


def test_report_json_is_strict_json_with_null_where_nothing_was_scored_and_compare_reads_it(tmp_path):
    """NaN (an image left out, a landmark never visible) was written as a bare NaN token, which strict JSON
    readers refuse, and an image left out was listed among the worst images."""
    from medsapiens.evaluate.compare import comparison

    mask = np.ones((len(IDS), 19), dtype=bool)
    mask[3] = False  # an image left out
    mask[:, 7] = False  # a landmark never visible
    write_scored(tmp_path / "a", errors_of(0, 1.0), mask=mask)
    text = (tmp_path / "a" / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in report.json"))
    name = registry.get("head").names[7]
    assert report["per_image"]["img03"] is None and report["per_landmark"][name]["mre"] is None
    assert len(report["worst"]) == 10 and "img03" not in {entry["id"] for entry in report["worst"]}
    test = comparison([tmp_path / "a" / "report.json"] * 2)["paired"][0]
    assert (test["images"], test["left_out"]) == (11, 1)


def test_compare_refuses_what_is_not_a_report(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{}")
    refused_here(capsys, ["evaluate", "--compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")],
                 "not an evaluation report.json")


def test_predict_takes_an_image_reached_twice_once_and_keeps_real_duplicates_apart(tmp_path):
    from medsapiens.evaluate.predict import collect_inputs

    folder, other = tmp_path / "pngs", tmp_path / "other"
    folder.mkdir()
    other.mkdir()
    for path in (folder / "L1.png", folder / "L2.png", other / "L1.png"):
        Image.new("L", (8, 8)).save(path)
    given = [str(folder / "L1.png"), str(folder), str(tmp_path / "pngs" / ".." / "pngs" / "L2.png"), str(other)]
    assert collect_inputs(given) == [folder / "L1.png", folder / "L2.png", other / "L1.png"]  # the last: another file


@pytest.mark.parametrize(("validation", "way"), [
    ({"rule": "carved from train", "fraction": 0.1}, "(--opt leg.val_fraction=F)"),
    ({"rule": "val list"}, "(a longer --opt leg.val_list=FILE: this val split is the list's)"),
    ({"rule": "source split"}, "(this val split is the source's (source split); docs/splits.md lists the options"),
])
def test_a_val_split_too_small_to_calibrate_names_the_option_that_grows_it(validation, way):
    from medsapiens.evaluate.evaluate import calibration_shortfall
    from medsapiens.io.manifest import DatasetInfo, Manifest

    info = DatasetInfo(registry.BUILTIN["leg"], {"train": 40, "val": 1}, {"validation": validation})
    manifest = Manifest(datasets={"leg": info}, shards=[], inputs=41, rejected=0)
    assert way in calibration_shortfall(manifest, "leg", "val", 0.9)


def test_per_image_csv_reads_back_whatever_the_image_ids_hold(tmp_path):
    from medsapiens.evaluate.figures import errors_from_csv

    errors = errors_of(3, 1.0)
    ids = [f"scan, {n}" for n in range(len(IDS))]  # a comma in a file name
    protocol = Protocol(registry.get("head"))
    report = build_report(errors, np.ones_like(errors, dtype=bool), ids, protocol, "head", "synthetic errors",
                          np.full((len(ids), 2), 0.1))
    write_report(report, errors, ids, protocol.landmark_set.names, tmp_path)
    assert errors_from_csv(tmp_path / "per_image.csv") == pytest.approx(np.round(errors, 4), abs=1e-9)


def test_coverage_on_the_split_the_radii_were_calibrated_on_is_said_not_to_be_held_out():
    from medsapiens.evaluate.report import coverage_lines
    from medsapiens.evaluation import conformal

    names = registry.get("head").names
    errors, mask = np.random.default_rng(0).exponential(2.0, (12, 19)), np.ones((12, 19), bool)
    calibration = conformal.calibrate(errors, mask, 0.9, names, "mm", "val", True)
    same = conformal.coverage_report(errors, mask, calibration, names, "val")
    other = conformal.coverage_report(errors, mask, calibration, names, "test")
    assert (same["held_out"], other["held_out"]) == (False, True)
    assert same["overall"] == 1.0  # 12 images at 90%: each radius is the largest calibration error
    said = "\n".join(coverage_lines({"coverage": same}))
    assert "on the split the radii were calibrated on: not held out" in said
    assert "not held out" not in "\n".join(coverage_lines({"coverage": other}))
