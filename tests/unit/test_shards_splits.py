"""Splits (docs/splits.md): the published ones by default, a seeded val carved from train where a
source has none (recorded in the manifest, part of the options digest), never from a test split;
and the spacing COCO builds of registry sets carry."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsapiens.io.manifest import load
from medsapiens.launch.cli import main
from medsapiens.shards import readers
from medsapiens.shards.plan import PlanError, Scan, SourceSpec, carve_count, open_source, scan_source
from medsapiens.shards.readers import hand, leg

LEG_TEST = leg.read_list(leg.MEDSAPIENS_TEST)


def image(path: Path, size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 90).save(path)
    return path


def plan(dataset: str, root: Path, reader: str | None = None, **options) -> tuple[Scan, dict]:
    """Scan one source as the build's plan step does: (the scan, {source id: split})."""
    scan = Scan()
    scan_source(open_source(SourceSpec(dataset, str(root), reader, options)), scan)
    return scan, {s.source_id: s.split for s in scan.samples[dataset]}


def build(out: Path, *args) -> int:
    return main(["shards", "build", "--no-progress", "--workers", "1", "--out", str(out), *map(str, args)])


def isbi(root: Path, numbers) -> Path:
    """ISBI 2015 layout, 16x16 images, every landmark at (3, 4)."""
    for number in numbers:
        folder = "TrainingData" if number <= 150 else "Test1Data" if number <= 300 else "Test2Data"
        image(root / "RawImage" / folder / f"{number:03d}.bmp")
        for who in ("senior", "junior"):
            note = root / "AnnotationsByMD" / f"400_{who}" / f"{number:03d}.txt"
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text("3,4\n" * 19)
    return root


def expected_carve(ids: list[str], fraction: float, seed: int) -> list[str]:
    """The documented rule, written out: natural order, default_rng(seed) shuffle, first round(n*F)."""
    ordered = sorted(ids, key=lambda i: int(i))
    order = np.random.default_rng(seed).permutation(len(ordered))
    return sorted((ordered[i] for i in order[:max(1, round(len(ordered) * fraction))]), key=int)


# ---------------------------------------------------------------- the carve
def test_carve_count_rule():
    assert [carve_count(n, 0.1) for n in (0, 1, 2, 9, 20, 150)] == [0, 0, 1, 1, 2, 15]
    assert carve_count(2, 0.9) == 1  # train keeps at least one
    assert sorted(["L10", "L2", "L1"], key=readers.natural_key) == ["L1", "L2", "L10"]


def test_head_without_val_gets_a_recorded_deterministic_carve_disjoint_from_train_and_tests(tmp_path, capsys):
    root = isbi(tmp_path / "head", [*range(1, 21), *range(151, 156), *range(301, 304)])
    assert build(tmp_path / "one", "--source", f"head={root}") == 0
    printed = capsys.readouterr().out
    assert build(tmp_path / "two", "--source", f"head={root}") == 0
    one, two = load(tmp_path / "one"), load(tmp_path / "two")
    validation = one.datasets["head"].source["validation"]
    ids = [f"{i:03d}" for i in range(1, 21)]
    assert validation == {"rule": "carved from train", "fraction": 0.1, "seed": 0, "ids": expected_carve(ids, 0.1, 0)}
    assert two.datasets["head"].source["validation"] == validation
    assert (tmp_path / "one" / "manifest.json").read_bytes() == (tmp_path / "two" / "manifest.json").read_bytes()
    assert one.datasets["head"].splits == {"train": 18, "val": 2, "test1": 5, "test2": 3}
    splits = {}
    for shard in one.shards:
        with tarfile.open(tmp_path / "one" / shard.url) as tar:
            splits.setdefault(shard.split, set()).update(name.split("_")[-1].split(".")[0] for name in tar.getnames())
    assert splits["val"] == set(validation["ids"])
    assert not splits["val"] & (splits["train"] | splits["test1"] | splits["test2"])
    assert "head (K=19): test1 5, test2 3, train 18, val 2; val carved from train: 2 id(s), fraction 0.1, seed 0" \
        in printed


def test_val_options_change_the_carve_and_the_options_digest(tmp_path, capsys):
    root = isbi(tmp_path / "head", [*range(1, 21), 151])
    _, seeded = plan("head", root, val_seed="3", val_fraction="0.25")
    ids = [f"{i:03d}" for i in range(1, 21)]
    assert sorted(i for i, s in seeded.items() if s == "val") == expected_carve(ids, 0.25, 3) != \
        expected_carve(ids, 0.25, 0)  # the seed matters
    assert build(tmp_path / "out", "--source", f"head={root}") == 0
    capsys.readouterr()
    assert build(tmp_path / "out", "--source", f"head={root}", "--opt", "head.val_fraction=0.2") == 2
    err = capsys.readouterr().err  # refused as a build with other options, naming only what differs
    assert 'other options (sources[0].options.val_fraction: "0.1" -> "0.2"); ' in err and '"reader"' not in err
    assert build(tmp_path / "out", "--source", f"head={root}", "--opt", "head.val_fraction=0.2", "--overwrite") == 0
    assert load(tmp_path / "out").datasets["head"].splits["val"] == 4


def test_generic_val_options_are_known_to_every_reader_and_checked():
    with pytest.raises(readers.ReaderError, match="valid options: gt, val, val_fraction, val_seed"):
        readers.resolve_options(readers.load("isbi2015"), {"fraction": "0.1"})
    assert readers.resolve_options(readers.load("coco"), {})["val_fraction"] == "0.1"
    assert readers.resolve_options(hand, {})["val_fraction"] == "0.066"  # hand's own option sets the default
    with pytest.raises(PlanError, match="val_fraction='1.5' must lie between 0 and 1"):
        open_source(SourceSpec("head", ".", None, {"val_fraction": "1.5"}))
    with pytest.raises(PlanError, match="val_seed='-1' must be a non-negative integer"):  # numpy's traceback before
        open_source(SourceSpec("head", ".", None, {"val_seed": "-1"}))


@pytest.mark.parametrize("val, counts, rule", [
    ("gu2net", (130, 20), {"rule": "gu2net ids 131-150"}),
    ("seeded", (135, 15), None),
])
def test_head_val_options_on_the_150_training_ids(tmp_path, val, counts, rule):
    scan, splits = plan("head", isbi(tmp_path / "head", [*range(1, 151), 151, 301]), val=val)
    val_ids = sorted(i for i, s in splits.items() if s == "val")
    assert (list(splits.values()).count("train"), len(val_ids)) == counts
    assert splits["151"] == "test1" and splits["301"] == "test2"
    if rule:
        assert val_ids == [f"{i:03d}" for i in range(131, 151)] and scan.validation["head"] == rule
    else:
        assert scan.validation["head"]["ids"] == val_ids == expected_carve([f"{i:03d}" for i in range(1, 151)], 0.1, 0)


# ---------------------------------------------------------------- hand
def test_hand_defaults_to_gu2net_and_the_summary_warns_of_its_empty_test_split(tmp_path, capsys):
    assert readers.resolve_options(hand, {})["split"] == "gu2net"
    for i in range(5):
        image(tmp_path / "hand" / "jpg" / f"{3001 + i}.jpg")
    (tmp_path / "hand" / "all.csv").write_text("".join(f"{3001 + i}," + ",".join(["5"] * 74) + "\n" for i in range(5)))
    assert build(tmp_path / "out", "--source", f"hand={tmp_path / 'hand'}") == 0
    printed = capsys.readouterr().out
    assert load(tmp_path / "out").datasets["hand"].splits == {"train": 4, "val": 1}
    assert "warning: hand has no test split" in printed
    assert build(tmp_path / "seeded", "--source", f"hand={tmp_path / 'hand'}", "--opt", "hand.split=seeded",
                 "--opt", "hand.test_fraction=0.4") == 0
    assert "warning" not in capsys.readouterr().out


# ---------------------------------------------------------------- chest
def chest(root: Path, labelled: list[bool], size=(8, 8)) -> Path:
    """pngs/CHNCXR_<i>_0.png for every flag, labels/<name>.txt where the flag is set."""
    for i, has_label in enumerate(labelled, 1):
        image(root / "pngs" / f"CHNCXR_{i:04d}_0.png", size)
        if has_label:
            label = root / "labels" / f"CHNCXR_{i:04d}_0.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("6\n" + "0.5 0.5\n" * 6)
    return root


def test_chest_splits_the_279_labelled_names_as_gu2net_and_counts_the_unlabelled(tmp_path):
    flags = [i % 10 != 5 for i in range(1, 311)]  # 31 unlabelled PNGs among the names, as in the Shenzhen folder
    scan, splits = plan("chest", chest(tmp_path / "chest", flags))
    labelled = [f"CHNCXR_{i:04d}_0" for i, flag in enumerate(flags, 1) if flag]
    assert len(labelled) == 279 and not scan.rejected and scan.inputs == 279
    assert [splits[name] for name in labelled] == ["train"] * 195 + ["val"] * 34 + ["test"] * 50
    assert scan.unlabelled["chest"] == 31 and scan.validation["chest"]["rule"].startswith("gu2net name order")


def test_chest_build_reports_unlabelled_images_and_a_label_without_its_png(tmp_path, capsys):
    root = chest(tmp_path / "chest", [True, False, True, True, False, True, True], size=(16, 16))
    (root / "pngs" / "CHNCXR_0003_0.png").unlink()
    assert build(tmp_path / "out", "--source", f"chest={root}") == 0
    manifest = load(tmp_path / "out")
    assert (manifest.inputs, manifest.written, manifest.rejected) == (5, 4, 1)
    assert manifest.datasets["chest"].source["unlabelled_images"] == 2
    report = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in report] == [("CHNCXR_0003_0", "missing_image")]
    assert "2 unlabelled image(s) are not inputs" in capsys.readouterr().out


# ---------------------------------------------------------------- leg
def leg_case(root: Path, ids) -> Path:
    for image_id in ids:
        image(root / "pngs" / f"{image_id}.png")
        meta = {"gt": [[1, 2]] * 26, "ID": image_id, "spacing": [0.2, 0.1], "original_shape": [16, 16]}
        (root / "meta").mkdir(parents=True, exist_ok=True)
        (root / "meta" / f"{image_id}_meta.json").write_text(json.dumps(meta))
    return root


def test_leg_ships_medsapiens_test_ids_as_the_default_test_list(tmp_path):
    assert len(LEG_TEST) == 50 == len(set(LEG_TEST)) and LEG_TEST[0] == "1061" and LEG_TEST[-1] == "2134"
    assert "#" in leg.MEDSAPIENS_TEST.read_text()  # commented, and comments are skipped
    root = leg_case(tmp_path / "leg", ["1061", "1067", "2134", *map(str, range(1, 11))])
    scan, splits = plan("leg", root)
    assert {i for i, s in splits.items() if s == "test"} == {"1061", "1067", "2134"}
    carved = [i for i, s in splits.items() if s == "val"]
    assert carved == expected_carve(list(map(str, range(1, 11))), 0.1, 0) == ["5"]  # natural order: 1, 2, ..., 10
    assert scan.validation["leg"]["rule"] == "carved from train"
    assert sorted(r["id"] for r in scan.rejected) == sorted(set(LEG_TEST) - {"1061", "1067", "2134"})
    assert {r["reason"] for r in scan.rejected} == {"missing_image"}  # published test ids absent: said loudly
    (root / "test.txt").write_text("# mine\n1\n")
    _, splits = plan("leg", root)
    assert {i for i, s in splits.items() if s == "test"} == {"1"}
    (root / "other.txt").write_text("2.png\n")
    _, splits = plan("leg", root, test_list="other.txt")
    assert {i for i, s in splits.items() if s == "test"} == {"2"}


# ---------------------------------------------------------------- COCO spacing
def coco_json(path: Path, images, k: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    annotations = [{"image_id": entry["id"], "keypoints": [2, 3, 2] * k} for entry in images]
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "keypoints": [f"p{i}" for i in range(k)]}]}))
    return path


def test_head_coco_takes_the_registry_spacing_unless_the_image_gives_one(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    path = coco_json(tmp_path / "head_coco_test_annotations.json", [
        {"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png", "spacing": [0.2, 0.3]}], 19)
    scan, _ = plan("head", path, "coco")
    by_id = {s.source_id: s for s in scan.samples["head"]}
    assert by_id["a"].spacing_mm == (0.1, 0.1) and by_id["a"].spacing_from == "registry 'head' native 0.1 mm/px"
    assert by_id["b"].spacing_mm == (0.2, 0.3) and by_id["b"].spacing_from == "COCO image spacing [sx, sy]"


def test_leg_coco_reads_medsapiens_meta_json_beside_the_annotations(tmp_path):
    for name in ("Leg_1061.png", "Leg_1067.png", "Leg_9.png"):
        image(tmp_path / "Images" / name)  # MedSapiens' data/med_sapien/Images
    (tmp_path / "leg_meta_json").mkdir()
    (tmp_path / "leg_meta_json" / "1061_meta.json").write_text(json.dumps({"spacing": [0.155, 0.15]}))
    (tmp_path / "leg_meta_json" / "1067_meta.json").write_text(json.dumps({"spacing": [0.5, 0.5]}))
    path = coco_json(tmp_path / "leg_coco_test_annotations.json", [
        {"id": 1061, "file_name": "Leg_1061.png", "width": 16, "height": 16},
        {"id": 1067, "file_name": "Leg_1067.png", "spacing": [0.14, 0.14]},
        {"id": 9, "file_name": "Leg_9.png"}], 26)
    scan, splits = plan("leg", path, "coco")
    by_id = {s.source_id: s for s in scan.samples["leg"]}
    assert by_id["Leg_1061"].spacing_mm == (0.15, 0.155)  # [sy, sx] reversed
    assert by_id["Leg_1061"].spacing_from == "leg_meta_json/<id>_meta.json spacing [sy, sx]"
    assert by_id["Leg_1067"].spacing_mm == (0.14, 0.14)  # the image's own spacing wins
    assert by_id["Leg_9"].spacing_mm is None and by_id["Leg_9"].spacing_from == "none"
    assert set(splits.values()) == {"test"} and not scan.rejected


# ---------------------------------------------------------------- your own data: a test split, empty sources
def widget(root: Path, n: int) -> Path:
    """A COCO set `widget` in one JSON: n images 0..n-1, 3 landmarks each."""
    for i in range(n):
        image(root / f"{i}.png")
    return coco_json(root / "widget.json", [{"id": i, "file_name": f"{i}.png"} for i in range(n)], 3)


def test_a_coco_test_fraction_carves_a_seeded_test_split_recorded_in_the_manifest(tmp_path, capsys):
    path = widget(tmp_path / "widget", 20)
    scan, splits = plan("widget", path, "coco", test_fraction="0.25", test_seed="3")
    test = sorted((i for i, s in splits.items() if s == "test"), key=int)
    assert test == expected_carve([str(i) for i in range(20)], 0.25, 3) and len(test) == 5
    assert sum(s == "val" for s in splits.values()) == 2 and set(test).isdisjoint(scan.validation["widget"]["ids"])
    assert scan.test["widget"] == {"rule": "carved from train", "fraction": 0.25, "seed": 3, "ids": test}
    assert build(tmp_path / "out", "--source", f"widget:coco={path}", "--opt", "widget.test_fraction=0.25",
                 "--opt", "widget.test_seed=3") == 0
    info = load(str(tmp_path / "out")).datasets["widget"]
    assert info.splits == {"train": 13, "val": 2, "test": 5} and info.source["test"]["ids"] == test
    assert "test carved from train: 5 id(s), fraction 0.25, seed 3" in capsys.readouterr().out
    with pytest.raises(PlanError, match="test_fraction carves a test split from train, but the source has test"):
        plan("widget", coco_json(tmp_path / "widget" / "widget_coco_test_annotations.json",
                                 [{"id": 0, "file_name": "0.png"}], 3), "coco", test_fraction="0.5")


def test_two_sources_for_one_id_are_refused_with_the_ways_to_split_your_own_data(tmp_path, capsys):
    path = widget(tmp_path / "widget", 4)
    assert build(tmp_path / "out", "--source", f"widget:coco={path}", "--source", f"widget:coco={path}") == 2
    err = capsys.readouterr().err
    assert "given by more than one --source" in err and "_train_/_val_/_test_" in err
    assert "--opt ID.test_fraction=F" in err


def test_a_source_that_yields_no_sample_is_an_error_naming_its_layout(tmp_path, capsys):
    jpgs = tmp_path / "jpgs"
    image(jpgs / "a.jpg")
    assert build(tmp_path / "out", "--source", f"leg={jpgs}") == 2
    err = capsys.readouterr().err
    assert f"--source leg: none of the 50 input(s) found in {jpgs} can be used: 50 missing_image" in err
    assert "Reader 'leg' reads the layout: pngs/<id>.png; meta/<id>_meta.json" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_mistyped_builtin_id_gets_a_suggestion(tmp_path, capsys):
    assert build(tmp_path / "out", "--source", f"haed={tmp_path}") == 2
    assert "dataset 'haed' is not built in (head, hand, chest, leg, aariz); did you mean 'head'?" in capsys.readouterr().err
