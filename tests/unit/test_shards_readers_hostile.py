"""Readers on hostile input: each bad file is a rejection naming it, or one line (ReaderError / PlanError)
naming it; never a traceback, never a value read wrong."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsapiens.io import registry
from medsapiens.shards import readers
from medsapiens.shards.plan import PlanError, Scan, SourceSpec, open_source, scan_source
from medsapiens.shards.readers import RawSample, ReaderError, Rejected, aariz, coco, hand, isbi2015, leg

DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, too deep for Python's parser


def scan(module, root, **options):
    items = list(module.scan(Path(root), readers.resolve_options(module, options)))
    return [i for i in items if isinstance(i, RawSample)], [i for i in items if isinstance(i, Rejected)]


def reasons(rejected) -> dict[str, str]:
    return {r.source_id: r.reason for r in rejected}


# ---------------------------------------------------------------- leg
def leg_meta(root: Path, image_id: str, **fields) -> Path:
    meta = {"gt": [[1, 2]] * 26, "ID": image_id, "spacing": [0.2, 0.1], "original_shape": [70, 30], **fields}
    path = root / "meta" / f"{image_id}_meta.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta))
    (root / "test.txt").touch()  # else the shipped MedSapiens test list applies
    return path


@pytest.mark.parametrize("field, value, reason", [
    ("spacing", "12", "bad_spacing"),            # was read as [1.0, 2.0]
    ("spacing", [0.1], "bad_spacing"),
    ("spacing", [0.1, 0], "bad_spacing"),
    ("spacing", [0.1, "0.2"], "bad_spacing"),
    ("spacing", [10 ** 400, 0.1], "bad_spacing"),  # a JSON integer too large for a float
    ("original_shape", "12", "bad_annotation"),  # was read as H=1, W=2
    ("original_shape", [70.5, 30], "bad_annotation"),
    ("gt", ["12"] * 26, "bad_annotation"),       # was read as points (1, 2)
])
def test_leg_meta_values_that_are_not_pairs_of_numbers_are_rejected(tmp_path, field, value, reason):
    leg_meta(tmp_path, "good")
    bad = leg_meta(tmp_path, "bad", **{field: value})
    samples, rejected = scan(leg, tmp_path)
    assert [s.source_id for s in samples] == ["good"] and samples[0].spacing_mm == (0.1, 0.2)
    assert [(r.source_id, r.reason, r.source) for r in rejected] == [("bad", reason, str(bad))]
    assert str(bad) in rejected[0].detail and field in rejected[0].detail


def test_leg_meta_nested_too_deep_is_a_rejection_naming_it(tmp_path):
    leg_meta(tmp_path, "good")
    deep = tmp_path / "meta" / "deep_meta.json"
    deep.write_text(DEEP)
    samples, rejected = scan(leg, tmp_path)
    assert [s.source_id for s in samples] == ["good"]
    assert reasons(rejected) == {"deep": "bad_annotation"} and "nested too deep" in rejected[0].detail
    assert str(deep) in rejected[0].detail


def test_leg_meta_that_cannot_be_read_is_a_rejection_naming_it(tmp_path):
    leg_meta(tmp_path, "good")
    folder = tmp_path / "meta" / "odd_meta.json"
    folder.mkdir()
    samples, rejected = scan(leg, tmp_path)
    assert [s.source_id for s in samples] == ["good"] and reasons(rejected) == {"odd": "bad_annotation"}
    assert rejected[0].detail == f"{folder} cannot be read: Is a directory"


def test_a_coco_file_that_cannot_be_read_is_one_line_naming_it(tmp_path):
    (tmp_path / "ann.json").mkdir()
    with pytest.raises(ReaderError, match=rf"{tmp_path / 'ann.json'} cannot be read: Is a directory"):
        scan(coco, tmp_path)


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_leg_list_not_utf8_is_one_line_naming_it(tmp_path, encoding):
    leg_meta(tmp_path, "good")
    (tmp_path / "test.txt").write_text("göod\n", encoding=encoding)
    with pytest.raises(ReaderError, match=r"test\.txt is not UTF-8 text"):
        scan(leg, tmp_path)


# ---------------------------------------------------------------- hand
@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_hand_table_not_utf8_is_one_line_naming_it(tmp_path, encoding):
    (tmp_path / "all.csv").write_text("é7," + ",".join(["1.5"] * 74) + "\n", encoding=encoding)
    with pytest.raises(ReaderError, match=r"all\.csv is not UTF-8 text"):
        scan(hand, tmp_path)
    with pytest.raises(PlanError, match=r"--source hand: .*all\.csv is not UTF-8 text"):
        scan_source(open_source(SourceSpec("hand", str(tmp_path))), Scan())


def test_hand_table_with_a_stray_quote_costs_that_row_only(tmp_path):
    for image_id in ("3001", "3002"):
        (tmp_path / "jpg").mkdir(exist_ok=True)
        (tmp_path / "jpg" / f"{image_id}.jpg").touch()
    (tmp_path / "all.csv").write_text('"3001,' + ",".join(["1.5"] * 74) + "\n3002," + ",".join(["2.5"] * 74) + "\n")
    samples, rejected = scan(hand, tmp_path)
    assert [s.source_id for s in samples] == ["3002"] and samples[0].landmarks[0] == (2.5, 2.5)
    assert [(r.source_id, r.reason, r.source) for r in rejected] == [('"3001', "missing_image", f"{tmp_path / 'all.csv'}:1")]


@pytest.mark.parametrize("options, message", [
    ({"test_fraction": "nan"}, r"test_fraction='nan' must lie in \[0, 1\)"),
    ({"test_fraction": "1.5"}, r"test_fraction='1.5' must lie in \[0, 1\)"),
    ({"test_fraction": "-0.1"}, r"test_fraction='-0.1' must lie in \[0, 1\)"),
    ({"seed": "-1"}, r"seed='-1' must be a non-negative integer"),
    ({"seed": "1.5"}, r"seed='1.5' is not a valid int"),
    ({"test_fraction": "0.6", "val_fraction": "0.5"}, r"leave no train"),
    ({"split": "random"}, r"split='random' must be one of gu2net, seeded"),
])
def test_hand_split_options_are_refused_when_the_source_opens(tmp_path, options, message):
    (tmp_path / "all.csv").write_text("7," + ",".join(["1.5"] * 74) + "\n")
    spec = SourceSpec("hand", str(tmp_path), options={"split": "seeded", **options})
    with pytest.raises(PlanError, match=f"--source hand: option.*{message}"):
        open_source(spec)


def test_hand_seeded_options_in_range_still_open(tmp_path):
    (tmp_path / "all.csv").write_text("7," + ",".join(["1.5"] * 74) + "\n")
    options = {"split": "seeded", "test_fraction": "0", "seed": "12"}
    assert open_source(SourceSpec("hand", str(tmp_path), options=options)).options["seed"] == "12"
    gu2net = {"split": "gu2net", "test_fraction": "0.5", "val_fraction": "0.6"}  # the gu2net split is fixed
    with pytest.raises(PlanError, match=r"option\(s\) val_fraction=0.6, test_fraction=0.5 apply with split=seeded only"):
        open_source(SourceSpec("hand", str(tmp_path), options=gu2net))
    open_source(SourceSpec("hand", str(tmp_path), options={"split": "gu2net", "seed": "0"}))  # the default, said


# ---------------------------------------------------------------- ISBI 2015
def test_isbi_id_of_non_ascii_digits_is_rejected(tmp_path):
    note = tmp_path / "AnnotationsByMD" / "400_senior" / "00².txt"
    note.parent.mkdir(parents=True)
    note.write_text("1,2\n" * 19)
    samples, rejected = scan(isbi2015, tmp_path, gt="senior")
    assert samples == [] and reasons(rejected) == {"00²": "bad_annotation"}


def test_isbi_annotation_not_utf8_is_a_rejection_naming_it_once(tmp_path):
    note = tmp_path / "AnnotationsByMD" / "400_senior" / "001.txt"
    note.parent.mkdir(parents=True)
    note.write_text("1,2\n" * 18 + "é,1\n", encoding="latin-1")
    samples, rejected = scan(isbi2015, tmp_path, gt="senior")
    assert samples == [] and reasons(rejected) == {"001": "bad_annotation"}
    assert rejected[0].detail.startswith(f"{note} is not UTF-8 text") and rejected[0].detail.count(str(note)) == 1


# ---------------------------------------------------------------- COCO
def coco_data(images, annotations) -> dict:
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "keypoints": ["a", "b"]}]}


def coco_file(path: Path, images, annotations) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco_data(images, annotations)))
    return path


GOOD_IMAGE = {"id": 1, "file_name": "a.png", "width": 40, "height": 30}
GOOD_ANNOTATION = {"image_id": 1, "keypoints": [1, 2, 2, 3, 4, 2]}


@pytest.mark.parametrize("spacing", ["12", [0.1], [0.1, -1], [True, 0.1], {"x": 0.1}])
def test_coco_image_spacing_that_is_not_two_numbers_is_rejected(tmp_path, spacing):
    path = coco_file(tmp_path / "ann.json", [{**GOOD_IMAGE, "spacing": spacing}], [GOOD_ANNOTATION])
    samples, rejected = scan(coco, path)
    assert samples == [] and reasons(rejected) == {"a": "bad_spacing"} and str(path) in rejected[0].detail


def test_coco_meta_file_spacing_that_is_not_two_numbers_is_rejected(tmp_path):
    path = coco_file(tmp_path / "spine_coco_train_annotations.json", [GOOD_IMAGE], [GOOD_ANNOTATION])
    meta = tmp_path / "spine_meta_json" / "1_meta.json"
    meta.parent.mkdir()
    meta.write_text(json.dumps({"spacing": "12"}))
    samples, rejected = scan(coco, path)
    assert samples == [] and reasons(rejected) == {"a": "bad_spacing"} and str(meta) in rejected[0].detail
    meta.write_text(DEEP)
    samples, rejected = scan(coco, path)
    assert reasons(rejected) == {"a": "bad_annotation"} and f"{meta}: JSON nested too deep" in rejected[0].detail
    meta.write_text(json.dumps({"spacing": [0.2, 0.1]}))
    samples, rejected = scan(coco, path)
    assert not rejected and samples[0].spacing_mm == (0.1, 0.2)


def test_coco_image_id_listed_twice_keeps_the_first_and_counts_the_second(tmp_path):
    images = [GOOD_IMAGE, {**GOOD_IMAGE, "file_name": "b.png"}]
    path = coco_file(tmp_path / "ann.json", images, [GOOD_ANNOTATION])
    samples, rejected = scan(coco, path)
    assert [s.source_id for s in samples] == ["a"]
    assert reasons(rejected) == {"b": "duplicate_id"} and "the first is kept" in rejected[0].detail
    found = Scan()
    (tmp_path / "a.png").write_bytes(b"")  # the plan only needs the file to exist
    scan_source(open_source(SourceSpec("spine", str(path), "coco")), found)
    assert found.inputs == 2 and [r["reason"] for r in found.rejected] == ["duplicate_id"]


@pytest.mark.parametrize("images, annotations, rejected_as", [
    ([{**GOOD_IMAGE, "width": "abc"}], [GOOD_ANNOTATION], {"a": "bad_annotation"}),
    ([{**GOOD_IMAGE, "height": 30.5}], [GOOD_ANNOTATION], {"a": "bad_annotation"}),
    ([{"id": 2, "file_name": ["b.png"]}, GOOD_IMAGE], [GOOD_ANNOTATION, {**GOOD_ANNOTATION, "image_id": 2}],
     {"image-2": "bad_annotation"}),
    ([GOOD_IMAGE, {"file_name": "b.png"}], [GOOD_ANNOTATION], {"image-1": "bad_annotation"}),
    ([GOOD_IMAGE, 5], [GOOD_ANNOTATION], {"image-1": "bad_annotation"}),
    ([GOOD_IMAGE, {"id": [2], "file_name": "b.png"}], [GOOD_ANNOTATION], {"image-1": "bad_annotation"}),
    ([GOOD_IMAGE], [GOOD_ANNOTATION, "x"], {"annotation-1": "bad_annotation"}),
    ([GOOD_IMAGE], [GOOD_ANNOTATION, {"image_id": [1]}], {"annotation-1": "bad_annotation"}),
    ([{**GOOD_IMAGE, "id": 2, "file_name": "b.png"}, GOOD_IMAGE],
     [GOOD_ANNOTATION, {"image_id": 2, "keypoints": "123456"}], {"b": "bad_annotation"}),
])
def test_coco_malformed_entries_are_rejected_and_the_rest_kept(tmp_path, images, annotations, rejected_as):
    path = coco_file(tmp_path / "ann.json", images, annotations)
    samples, rejected = scan(coco, path)
    assert [s.source_id for s in samples] == (["a"] if "a" not in rejected_as else [])
    assert reasons(rejected) == rejected_as and all(str(path) in r.detail for r in rejected)


@pytest.mark.parametrize("data, message", [
    (coco_data({"a": 1}, []), "images must be a list"),
    (coco_data([GOOD_IMAGE], {"0": GOOD_ANNOTATION}), "annotations must be a list"),
    ({**coco_data([GOOD_IMAGE], [GOOD_ANNOTATION]), "categories": "x"}, "categories must be a list"),
])
def test_coco_top_level_of_the_wrong_type_is_one_line_naming_the_file(tmp_path, data, message):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ReaderError, match=f"ann.json: {message}"):
        scan(coco, path)


def test_coco_file_not_json_deep_or_not_utf8_is_one_line_naming_it(tmp_path):
    path = tmp_path / "ann.json"
    for text, message in ((DEEP, "JSON nested too deep"), ("{", "not valid JSON")):
        path.write_text(text)
        with pytest.raises(ReaderError, match=f"ann.json: {message}"):
            scan(coco, path)
    path.write_text(json.dumps(coco_data([GOOD_IMAGE], [GOOD_ANNOTATION])), encoding="utf-16")
    with pytest.raises(ReaderError, match=r"ann\.json is not UTF-8 text"):
        scan(coco, path)
    with pytest.raises(PlanError, match=r"--source spine: .*ann\.json is not UTF-8 text"):
        scan_source(open_source(SourceSpec("spine", str(path), "coco")), Scan())


@pytest.mark.parametrize("category, message", [
    ({"keypoints": "ab"}, "keypoints must be a list of names"),
    ({"keypoints": ["a", "b"], "flip_pairs": [[0, 5]]}, "flip_pairs must be"),
    ({"keypoints": ["a", "b"], "flip_pairs": 3}, "flip_pairs must be"),
    ({"keypoints": ["a", "b", "c"], "flip_pairs": [[0, 1], [1, 2]]}, r"flip_pairs put keypoint 1 \('b'\) in two pairs"),
])
def test_coco_category_of_the_wrong_shape_is_one_line(tmp_path, category, message):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({**coco_data([GOOD_IMAGE], [GOOD_ANNOTATION]), "categories": [category]}))
    with pytest.raises(ReaderError, match=f"ann.json: the category's {message}|ann.json: {message}"):
        coco.landmark_names(path, {})


def test_coco_flip_pairs_listed_both_ways_or_twice_are_one_pair():
    category = {"keypoints": ["a", "b", "c"], "flip_pairs": [[0, 1], [1, 0], [0, 1], [2, 2]]}
    names, pairs = coco.category_landmarks(category, Path("ann.json"))
    landmarks = registry.custom("spine", names, pairs)
    assert landmarks.flip_permutation() == [1, 0, 2]


# ---------------------------------------------------------------- Aariz
def aariz_case(root: Path, ids=("A1", "A2")) -> None:
    for image_id in ids:
        for who in aariz.ANNOTATORS:
            note = root / "train" / "Annotations" / "Cephalometric Landmarks" / who / f"{image_id}.json"
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(json.dumps({"landmarks": [{"value": {"x": 1, "y": 2}}] * 29}))


def test_aariz_annotation_nested_too_deep_is_a_rejection_naming_it(tmp_path):
    aariz_case(tmp_path)
    deep = tmp_path / "train" / "Annotations" / "Cephalometric Landmarks" / "Senior Orthodontists" / "A2.json"
    deep.write_text(DEEP)
    samples, rejected = scan(aariz, tmp_path)
    assert [s.source_id for s in samples] == ["A1"]
    assert reasons(rejected) == {"A2": "bad_annotation"} and f"{deep}: JSON nested too deep" in rejected[0].detail


@pytest.mark.parametrize("x", ["1", True, None])
def test_aariz_coordinates_that_are_not_numbers_are_a_rejection_naming_the_file(tmp_path, x):
    aariz_case(tmp_path)
    junior = tmp_path / "train" / "Annotations" / "Cephalometric Landmarks" / "Junior Orthodontists" / "A2.json"
    junior.write_text(json.dumps({"landmarks": [{"value": {"x": x, "y": 2}}] + [{"value": {"x": 1, "y": 2}}] * 28}))
    samples, rejected = scan(aariz, tmp_path)
    assert [s.source_id for s in samples] == ["A1"] and reasons(rejected) == {"A2": "bad_annotation"}
    assert rejected[0].detail.startswith(f"{junior}: landmark values' x and y must be a list of [x, y] numbers")


@pytest.mark.parametrize("table, message", [
    ("image_id,pixel_size\nA1,0.1\nA2,0.1\nA1,0.12\n", r"id 'A1' has spacing '0.1' at line 2 and '0.12' at line 4"),
    ("cephalogram_id,machine,pixel_size\nA1,C,0.1\nA2,0.1\n", r"line 3 is short: 2 of the header's 3 columns"),
])
def test_aariz_spacing_table_short_row_or_conflicting_ids_is_one_line(tmp_path, table, message):
    aariz_case(tmp_path)
    (tmp_path / "spacing.csv").write_text(table)
    with pytest.raises(ReaderError, match=rf"spacing\.csv:? {message}"):
        scan(aariz, tmp_path, spacing_csv="spacing.csv")


def test_aariz_spacing_table_values(tmp_path):
    aariz_case(tmp_path, ("A1", "A2", "A3", "A4"))
    (tmp_path / "spacing.csv").write_text("image_id,pixel_size\nA1,0.1\nA1,0.10\nA2,nan\nA3,-1\n")
    samples, rejected = scan(aariz, tmp_path, spacing_csv="spacing.csv")
    assert [(s.source_id, s.spacing_mm) for s in samples] == [("A1", (0.1, 0.1))]  # the same value twice is fine
    assert reasons(rejected) == {"A2": "bad_spacing", "A3": "bad_spacing", "A4": "bad_spacing"}
    assert all("spacing.csv" in r.detail for r in rejected)
    (tmp_path / "spacing.csv").write_text("image_id,pixel_size\nA1,0.1\n", encoding="utf-16")
    with pytest.raises(ReaderError, match=r"spacing\.csv is not UTF-8 text"):
        scan(aariz, tmp_path, spacing_csv="spacing.csv")


def test_json_and_annotation_files_past_the_size_limit_are_refused_before_parsing(tmp_path, monkeypatch):
    from medsapiens.errors import InputError
    from medsapiens.io import jsondoc, manifest

    monkeypatch.setattr(jsondoc, "MAX_BYTES", 1 << 20)
    big = json.dumps(coco_data([GOOD_IMAGE] * 20_000, [GOOD_ANNOTATION]))
    assert len(big) > 1 << 20
    for name in ("ann.json", "manifest.json"):
        (tmp_path / name).write_text(big)
    too_big = r"more than 1 MiB, more than any annotation, manifest, report or config file needs; refused before parsing"
    with pytest.raises(ReaderError, match=rf"ann\.json: {too_big}"):
        scan(coco, tmp_path / "ann.json")
    with pytest.raises(ReaderError, match=rf"^{tmp_path / 'ann.json'}: {too_big}"):  # a table (hand's all.csv) too
        readers.read_text(tmp_path / "ann.json")
    with pytest.raises(manifest.ManifestError, match=rf"manifest\.json: {too_big}"):
        manifest.load(tmp_path)
    with pytest.raises(InputError, match=rf"predictions file: {too_big}"):
        jsondoc.read(tmp_path / "ann.json", "predictions file")
    leg_meta(tmp_path / "leg", "good")
    (tmp_path / "leg" / "meta" / "big_meta.json").write_text(big)
    samples, rejected = scan(leg, tmp_path / "leg")
    assert [s.source_id for s in samples] == ["good"] and reasons(rejected) == {"big": "bad_annotation"}
    assert "big_meta.json: more than 1 MiB" in rejected[0].detail
