"""Each reader on data in its native layout: the phantoms, and small hand-made edge cases."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsapiens.io import registry
from medsapiens.shards import readers
from medsapiens.shards.phantoms import write_phantoms
from medsapiens.shards.plan import PlanError, Scan, SourceSpec, open_source, scan_source
from medsapiens.shards.readers import RawSample, ReaderError, Rejected, aariz, chest, coco, dicom, hand, isbi2015, leg


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantoms(tmp_path_factory.mktemp("phantoms"), n=8, seed=1)


def scan(module, root, **options):
    items = list(module.scan(Path(root), readers.resolve_options(module, options)))
    return [i for i in items if isinstance(i, RawSample)], [i for i in items if isinstance(i, Rejected)]


def small_image(path: Path, size=(40, 30), mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 90).save(path)
    return path


# ---------------------------------------------------------------- ISBI 2015
def test_isbi_phantoms_follow_official_id_ranges_and_mean_the_doctors(phantoms):
    samples, rejected = scan(isbi2015, phantoms["head"])
    assert not rejected and len(samples) == 8
    assert {s.split for s in samples} == {"train", "test1", "test2"}
    for s in samples:
        number = int(s.source_id)
        assert s.split == ("train" if number <= 150 else "test1" if number <= 300 else "test2")
        senior, junior = (np.loadtxt(phantoms["head"] / "AnnotationsByMD" / f"400_{who}" / f"{s.source_id}.txt",
                                     delimiter=",", max_rows=19) for who in ("senior", "junior"))
        np.testing.assert_allclose(s.landmarks, (senior + junior) / 2)
        assert s.spacing_mm == (0.1, 0.1) and Path(s.image).is_file()


def write_isbi_case(root: Path) -> None:
    small_image(root / "RawImage" / "Test1Data" / "151.bmp", (60, 50))
    for who, offset in (("senior", 0), ("junior", 4)):
        lines = [f"{10 + i + offset},{20 + offset}" for i in range(19)] + ["2", "1"]
        note = root / "AnnotationsByMD" / f"400_{who}" / "151.txt"
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text("\n".join(lines) + "\n")
    only_senior = root / "AnnotationsByMD" / "400_senior" / "152.txt"
    only_senior.write_text("\n".join(["5,5"] * 19))
    small_image(root / "RawImage" / "Test1Data" / "152.bmp", (60, 50))


@pytest.mark.parametrize("gt, first", [("senior", (10, 20)), ("junior", (14, 24)), ("mean", (12, 22))])
def test_isbi_ground_truth_option(tmp_path, gt, first):
    write_isbi_case(tmp_path)
    samples, rejected = scan(isbi2015, tmp_path, gt=gt)
    by_id = {s.source_id: s for s in samples}
    assert by_id["151"].landmarks[0] == first and len(by_id["151"].landmarks) == 19  # extra label lines skipped
    assert by_id["151"].split == "test1"
    if gt == "junior" or gt == "mean":  # 152 has no junior annotation
        assert [(r.source_id, r.reason, r.split) for r in rejected] == [("152", "missing_annotation", "test1")]
    else:
        assert "152" in by_id and not rejected


@pytest.mark.parametrize("broken, reason, detail", [
    ("junior", "bad_annotation", "line 5 is '835;996', expected 'x,y'"),
    ("senior", "wrong_landmark_count", "18 landmark lines, expected 19"),
])
def test_isbi_rejects_the_mean_naming_the_doctor_file_at_fault(tmp_path, broken, reason, detail):
    write_isbi_case(tmp_path)
    note = tmp_path / "AnnotationsByMD" / f"400_{broken}" / "151.txt"
    lines = note.read_text().splitlines()
    lines[4:5] = ["835;996"] if broken == "junior" else []
    note.write_text("\n".join(lines[:18] if broken == "senior" else lines) + "\n")
    samples, rejected = scan(isbi2015, tmp_path, gt="mean")
    assert "151" not in {s.source_id for s in samples}
    assert [(r.reason, r.source, r.detail) for r in rejected if r.source_id == "151"] == [
        (reason, str(note), f"{note}: {detail}")]


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ReaderError, match="valid options: gt"):
        readers.resolve_options(isbi2015, {"gold": "senior"})
    with pytest.raises(ReaderError, match="must be one of senior, junior, mean"):
        scan(isbi2015, ".", gt="both")


# ---------------------------------------------------------------- hand
def test_hand_phantoms_read_from_all_csv(phantoms):
    samples, rejected = scan(hand, phantoms["hand"])
    assert not rejected and len(samples) == 8
    rows = {line.split(",")[0]: line.split(",")[1:] for line in (phantoms["hand"] / "all.csv").read_text().split()}
    for s in samples:
        assert len(s.landmarks) == 37 and s.spacing_mm is None
        np.testing.assert_allclose(np.ravel(s.landmarks), [float(v) for v in rows[s.source_id]])


def test_hand_split_options():
    ids = [str(3000 + i) for i in range(700)]
    default = hand.assign_splits(ids, readers.resolve_options(hand, {}))
    assert [default[i] for i in ids] == ["train"] * 550 + ["val"] * 59 + ["test"] * 91  # GU2Net's, the default
    assert default == hand.assign_splits(list(reversed(ids)), readers.resolve_options(hand, {}))
    seeded_options = readers.resolve_options(hand, {"split": "seeded"})
    seeded = hand.assign_splits(ids, seeded_options)
    counts = {name: list(seeded.values()).count(name) for name in ("train", "val", "test")}
    assert counts == {"test": round(700 * 0.32), "val": round(700 * 0.066), "train": 700 - 224 - 46}
    assert seeded == hand.assign_splits(list(reversed(ids)), seeded_options)  # order-free
    assert seeded != hand.assign_splits(ids, {**seeded_options, "seed": "1"})


def test_hand_reports_rows_without_an_image_and_counts_images_without_a_row_as_unlabelled(tmp_path):
    for image_id in ("7", "8", "10"):
        small_image(tmp_path / "jpg" / f"{image_id}.jpg")
    (tmp_path / "all.csv").write_text("7," + ",".join(["1.5"] * 74) + "\n\n9,1,2\n10,1,2,3\n")
    items = list(hand.scan(tmp_path, readers.resolve_options(hand, {})))
    samples = [i for i in items if isinstance(i, RawSample)]
    assert [s.source_id for s in samples] == ["7"] and samples[0].landmarks[0] == (1.5, 1.5)
    assert [(i.source_id, i.reason, i.split, i.source) for i in items if isinstance(i, Rejected)] == [
        ("9", "missing_image", None, f"{tmp_path / 'all.csv'}:3"),  # in no split: GU2Net numbers images only
        ("10", "bad_annotation", "train", f"{tmp_path / 'all.csv'}:4")]
    assert [(i.source_id, i.source) for i in items if isinstance(i, readers.Unlabelled)] == [
        ("8", str(tmp_path / "jpg" / "8.jpg"))]  # an atlas image Payer did not label: not an input


def test_hand_gu2net_split_numbers_the_rows_that_have_an_image_as_its_loader_does(tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "all.csv").write_text("".join(f"{i},1,2\n" for i in range(3001, 3701)))
    (tmp_path / "jpg").mkdir()
    for i in range(3001, 3701):
        if i != 3005:
            (tmp_path / "jpg" / f"{i}.jpg").touch()
    samples, rejected = scan(hand, tmp_path)
    split = {s.source_id: s.split for s in samples}
    assert [split[str(i)] for i in (3551, 3552, 3610, 3611)] == ["train", "val", "val", "test"]
    assert [(r.source_id, r.reason, r.split) for r in rejected] == [("3005", "missing_image", None)]
    assert {name: list(split.values()).count(name) for name in ("train", "val", "test")} == {
        "train": 550, "val": 59, "test": 699 - 609}


def test_hand_without_a_landmark_table_names_both_places(tmp_path):
    with pytest.raises(ReaderError, match=f"no landmark table {tmp_path / 'all.csv'} or "
                                          f"{tmp_path / 'labels' / 'all.csv'}"):
        scan(hand, tmp_path)


# ---------------------------------------------------------------- chest
def test_chest_ratios_become_pixels_of_the_image(tmp_path):
    small_image(tmp_path / "pngs" / "c1.png", (200, 100))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "c1.txt").write_text("2\n0.5 0.25\n0.1 1.0\n")
    (tmp_path / "labels" / "c2.txt").write_text("3\n0.5 0.5\n")
    small_image(tmp_path / "pngs" / "c2.png")
    samples, rejected = scan(chest, tmp_path)
    assert samples[0].landmarks == ((100.0, 25.0), (20.0, 100.0)) and samples[0].expected_size == (200, 100)
    assert [(r.source_id, r.reason) for r in rejected] == [("c2", "bad_annotation")]


def test_chest_split_is_gu2net_order(phantoms):
    assert readers.order_split(279, (195 / 279, 34 / 279), ("train", "val", "test")) == \
        ["train"] * 195 + ["val"] * 34 + ["test"] * 50
    samples, _ = scan(chest, phantoms["chest"])
    names = sorted(s.source_id for s in samples)
    assert [s.split for s in sorted(samples, key=lambda s: s.source_id)] == \
        readers.order_split(len(names), (195 / 279, 34 / 279), ("train", "val", "test"))


# ---------------------------------------------------------------- leg
def test_leg_spacing_and_shape_are_reversed_to_x_y(tmp_path):
    small_image(tmp_path / "pngs" / "a.png", (30, 70))
    small_image(tmp_path / "pngs" / "b.png", (30, 70))
    (tmp_path / "meta").mkdir()
    for image_id in "ab":
        meta = {"gt": [[1, 2]] * 26, "ID": image_id, "spacing": [0.2, 0.1], "original_shape": [70, 30]}
        (tmp_path / "meta" / f"{image_id}_meta.json").write_text(json.dumps(meta))
    (tmp_path / "test.txt").write_text("b\n")
    samples, _ = scan(leg, tmp_path)
    assert samples[0].spacing_mm == (0.1, 0.2) and samples[0].expected_size == (30, 70)
    assert {s.source_id: s.split for s in samples} == {"a": "train", "b": "test"}
    (tmp_path / "mine.txt").write_text("a.png\n")
    samples, _ = scan(leg, tmp_path, val_list="mine.txt")
    assert {s.source_id: s.split for s in samples} == {"a": "val", "b": "test"}


def test_leg_phantoms_use_split_lists(phantoms):
    samples, rejected = scan(leg, phantoms["leg"])
    listed = {i: name for name in ("test", "val") for i in (phantoms["leg"] / f"{name}.txt").read_text().split()}
    assert not rejected and {s.source_id: s.split for s in samples} == \
        {s.source_id: listed.get(s.source_id, "train") for s in samples}


# ---------------------------------------------------------------- COCO
def coco_file(path: Path, images, annotations, names=("p0", "p1", "p2"), **category):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "x", "keypoints": list(names), **category}]}))
    return path


def test_coco_split_from_name_visibility_spacing_and_images_dir(tmp_path):
    small_image(tmp_path / "images" / "s1.png", (40, 30))
    small_image(tmp_path / "s2.png", (40, 30))
    path = coco_file(tmp_path / "spine_coco_valid_annotations.json", [
        {"id": 1, "file_name": "s1.png", "width": 40, "height": 30, "spacing": [0.3, 0.4]},
        {"id": 2, "file_name": "s2.png", "width": 40, "height": 30},
    ], [
        {"image_id": 1, "keypoints": [1, 2, 2, 0, 0, 0, 5, 6, 1]},
        {"image_id": 2, "keypoints": [1, 2, 2, 3, 4, 2, 5, 6, 2]},
    ], flip_pairs=[[0, 2]])
    samples, rejected = scan(coco, path)
    assert not rejected and [s.split for s in samples] == ["val", "val"]
    s1 = samples[0]
    assert s1.visible == (1, 0, 1) and s1.spacing_mm == (0.3, 0.4) and s1.image == str(tmp_path / "images" / "s1.png")
    assert coco.landmark_names(path, {}) == (("p0", "p1", "p2"), ((0, 2),))
    source = open_source(SourceSpec("spine", str(path), "coco"))
    scan_source(source, Scan())
    assert source.landmark_set.names == ("p0", "p1", "p2") and source.landmark_set.unit == "px"
    assert source.landmark_set.flip_pairs == ((0, 2),)


@pytest.mark.parametrize("name, split", [
    ("head_coco_test_annotations.json", "test"), ("isbi_test1.json", "test1"), ("Aariz_Test_annotations.json", "test"),
    ("hand_TEST.json", "test"), ("chest_testing.json", "test"), ("leg_validation.json", "val"), ("a.valid.json", "val"),
    ("spine train.json", "train"), ("contest.json", "default"), ("person_keypoints_val2017.json", "val"),
    ("train2017.json", "train"), ("test2017.json", "test2017"), ("testset.json", "test"), ("test(1).json", "test"),
    ("ceph_TrainSet.json", "train"), ("val-set.json", "val"), ("[test2] leg.json", "test2"), ("latest.json", "default")])
def test_coco_split_from_a_word_of_the_file_name_in_any_case(name, split):
    assert coco.split_from_name(Path(name), "default") == split


def test_coco_split_option_and_annotation_problems(tmp_path):
    path = coco_file(tmp_path / "ann.json", [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
                     [{"image_id": 1, "keypoints": [1, 2, 2]}, {"image_id": 1, "keypoints": [1, 2, 2]},
                      {"image_id": 3, "keypoints": [1, 2, 2]}])
    samples, rejected = scan(coco, path, split="test")
    assert samples == [] and sorted((r.source_id, r.reason) for r in rejected) == \
        [("a", "bad_annotation"), ("annotation-2", "missing_image"), ("b", "missing_annotation")]
    assert {r.split for r in rejected} == {"test"}  # the split the file's images would have been in


def test_registry_dataset_through_coco_must_match_its_k(tmp_path):
    path = coco_file(tmp_path / "ann.json", [{"id": 1, "file_name": "a.png"}], [{"image_id": 1, "keypoints": [1, 2, 2] * 3}])
    with pytest.raises(PlanError, match="3 keypoints, the registry's 'head' has 19"):
        scan_source(open_source(SourceSpec("head", str(path), "coco")), Scan())


def test_registry_dataset_through_coco_keeps_the_registry_order_or_is_refused(tmp_path):
    """MedSapiens' files name the keypoints K0, K1, ... and are read in the registry's order; a file
    naming the registry's keypoints in another order, or giving other flip pairs, would flip and score
    the wrong landmarks."""
    leg = registry.get("leg")
    image = [{"id": 1, "file_name": "a.png"}]
    annotation = [{"image_id": 1, "keypoints": [1, 2, 2] * 26}]
    for folder in ("generic", "reordered", "paired", "same"):
        small_image(tmp_path / folder / "a.png", (40, 30))
    generic = coco_file(tmp_path / "generic" / "ann.json", image, annotation, names=[f"K{i}" for i in range(26)])
    source = open_source(SourceSpec("leg", str(generic), "coco"))
    scan_source(source, Scan())
    assert source.landmark_set == leg
    interleaved = [n for pair in zip(leg.names[:13], leg.names[13:], strict=True) for n in pair]
    interleaved[0] = "hip"  # not a permutation of the registry's names: still read by position, still refused
    reordered = coco_file(tmp_path / "reordered" / "ann.json", image, annotation, names=interleaved)
    with pytest.raises(PlanError, match="keypoints in another order \\(keypoint 1 is 'right_0', the registry's keypoint 13"):
        scan_source(open_source(SourceSpec("leg", str(reordered), "coco")), Scan())
    paired = coco_file(tmp_path / "paired" / "ann.json", image, annotation, names=[f"K{i}" for i in range(26)],
                       flip_pairs=[[2 * i, 2 * i + 1] for i in range(13)])
    with pytest.raises(PlanError, match="flip_pairs other than the registry's 'leg' pairs"):
        scan_source(open_source(SourceSpec("leg", str(paired), "coco")), Scan())
    same_pairs = coco_file(tmp_path / "same" / "ann.json", image, annotation, names=[f"K{i}" for i in range(26)],
                           flip_pairs=[[i + 13, i] for i in range(13)])
    scan_source(open_source(SourceSpec("leg", str(same_pairs), "coco")), Scan())


def test_a_name_listed_twice_is_not_taken_for_a_misplaced_one():
    assert registry.misplaced_name(["a", "a", "b"], ["a", "a", "b"]) is None
    assert registry.misplaced_name(["a", "b", "a"], ["a", "a", "b"]) == (1, 2)
    assert registry.misplaced_name(["K0", "K1"], ["left_0", "left_1"]) is None  # other names: not compared


# ---------------------------------------------------------------- Aariz
def aariz_note(path: Path, points, titles=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    titles = titles or [f"L{i}" for i in range(len(points))]
    marks = [{"landmark_id": i, "title": t, "value": {"x": x, "y": y}}
             for i, (t, (x, y)) in enumerate(zip(titles, points, strict=True))]
    path.write_text(json.dumps({"ceph_id": path.stem, "landmarks": marks}))


def test_aariz_means_the_annotators_and_maps_valid_to_val(tmp_path):
    for folder, image_id in (("Train", "t1"), ("VALID", "v1")):
        small_image(tmp_path / folder / "Cephalograms" / f"{image_id}.jpg", (50, 40), "RGB")
        notes = tmp_path / folder / "Annotations" / "Cephalometric Landmarks"
        aariz_note(notes / "Senior Orthodontists" / f"{image_id}.json", [(10, 20)] * 29)
        aariz_note(notes / "Junior Orthodontists" / f"{image_id}.json", [(12, 26)] * 29)
    (tmp_path / "spacing.csv").write_text("image_id,pixel_size\nt1,0.12\nv1,0.127\n")
    samples, rejected = scan(aariz, tmp_path, spacing_csv="spacing.csv")
    assert not rejected
    assert {s.source_id: (s.split, s.landmarks[0], s.spacing_mm) for s in samples} == {
        "t1": ("train", (11.0, 23.0), (0.12, 0.12)), "v1": ("val", (11.0, 23.0), (0.127, 0.127))}
    (tmp_path / "Train" / "Annotations" / "Cephalometric Landmarks" / "Junior Orthodontists" / "t1.json").unlink()
    samples, rejected = scan(aariz, tmp_path)
    assert [(r.source_id, r.reason, r.split) for r in rejected] == [("t1", "missing_annotation", "train")]
    assert samples[0].spacing_mm is None
    (tmp_path / "cephalogram_machine_mappings.csv").write_text("cephalogram_id,machine,pixel_size\nv1,C,0.14\n")
    samples, _ = scan(aariz, tmp_path)  # the table shipped with the dataset is used without an option
    assert samples[0].spacing_mm == (0.14, 0.14)


def test_aariz_pairs_the_annotators_by_title_not_position(tmp_path):
    small_image(tmp_path / "test" / "Cephalograms" / "c1.png", (50, 40))
    notes = tmp_path / "test" / "Annotations" / "Cephalometric Landmarks"
    senior = [(float(k), 2.0 * k) for k in range(29)]
    aariz_note(notes / "Senior Orthodontists" / "c1.json", senior)
    junior = notes / "Junior Orthodontists" / "c1.json"
    aariz_note(junior, [(x + 2, y) for x, y in reversed(senior)], [f"L{i}" for i in reversed(range(29))])
    samples, rejected = scan(aariz, tmp_path)
    assert not rejected and samples[0].landmarks == tuple((x + 1, y) for x, y in senior)
    aariz_note(junior, senior, [f"L{i}" for i in range(28)] + ["Sella"])
    samples, rejected = scan(aariz, tmp_path)
    assert not samples and rejected[0].reason == "bad_annotation" and "title different landmarks: ['L28', 'Sella']" in rejected[0].detail
    aariz_note(junior, senior, ["L0"] * 29)  # no title of its own per landmark
    samples, rejected = scan(aariz, tmp_path)
    assert not samples and "only the senior annotator titles every landmark" in rejected[0].detail


# ---------------------------------------------------------------- DICOM
def write_dicom(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", slope=None, intercept=None, **spacing):
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for tag, value in spacing.items():
        setattr(ds, tag, value)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


@pytest.fixture
def dicom_dir(tmp_path):
    ramp = np.tile(np.arange(40, dtype=np.uint16) * 1000, (30, 1))  # 0..39000: needs 16 bits
    write_dicom(tmp_path / "a.dcm", ramp, PixelSpacing=[0.2, 0.1])
    write_dicom(tmp_path / "b.dcm", ramp, ImagerPixelSpacing=[0.3, 0.15])
    write_dicom(tmp_path / "c.dcm", ramp, photometric="MONOCHROME1")
    write_dicom(tmp_path / "d.dcm", ramp // 1000, slope=2, intercept=100)
    write_dicom(tmp_path / "sub" / "orphan.dcm", ramp)
    images = [{"id": i, "file_name": f"{n}.dcm", "width": 40, "height": 30} for i, n in enumerate("abcd")]
    coco_file(tmp_path / "ann.json", images, [{"image_id": i, "keypoints": [1, 2, 2] * 3} for i in range(4)])
    return tmp_path


def test_dicom_spacing_tags_and_unannotated_files(dicom_dir):
    samples, rejected = scan(dicom, dicom_dir)
    by_id = {s.source_id: s for s in samples}
    assert by_id["a"].spacing_mm == (0.1, 0.2) and "PixelSpacing (0028,0030)" in by_id["a"].spacing_from
    assert by_id["b"].spacing_mm == (0.15, 0.3) and "ImagerPixelSpacing" in by_id["b"].spacing_from
    assert by_id["c"].spacing_mm is None and by_id["c"].spacing_from == "none"
    assert [(r.source_id, r.reason) for r in rejected] == [("orphan", "missing_annotation")]


def test_a_dicom_whose_annotation_is_rejected_is_counted_once(dicom_dir):
    images = [{"id": i, "file_name": f"{n}.dcm", "width": 40, "height": 30} for i, n in enumerate("abcd")]
    keypoints = [[1, 2, 2] * 3] * 3 + [[1, 2, 2, 5]]  # d's: not triples
    coco_file(dicom_dir / "ann.json", images, [{"image_id": i, "keypoints": k} for i, k in enumerate(keypoints)])
    samples, rejected = scan(dicom, dicom_dir)
    assert sorted(s.source_id for s in samples) == ["a", "b", "c"]
    assert sorted((r.source_id, r.reason) for r in rejected) == [("d", "bad_annotation"), ("orphan", "missing_annotation")]


def test_dicom_without_a_window_is_stretched_inverted_and_kept_16_bit(dicom_dir):
    from medsapiens.io.imageio import decode

    plain = decode(str(dicom_dir / "a.dcm"))  # no window: its own min..max onto 0..65535
    assert plain.dtype == np.uint16 and plain[0, 39] == 65535 and plain[0, 0] == 0
    np.testing.assert_array_equal(plain[0], np.rint(np.arange(40) * 65535 / 39).astype(np.uint16))
    inverted = decode(str(dicom_dir / "c.dcm"))
    np.testing.assert_array_equal(inverted, 65535 - plain)
    rescaled = decode(str(dicom_dir / "d.dcm"))  # 100..178 after slope 2, intercept 100: the same ramp
    np.testing.assert_array_equal(rescaled, plain)


def test_dicom_build_keeps_16_bits_and_records_the_spacing_tag(dicom_dir, tmp_path):
    import io
    import tarfile

    from medsapiens.io.manifest import load
    from medsapiens.launch.cli import main

    out = tmp_path / "out"
    assert main(["shards", "build", "--source", f"xr:dicom={dicom_dir}", "--out", str(out), "--max-side", "20",
                 "--workers", "1", "--no-progress"]) == 0
    manifest = load(out)
    assert manifest.datasets["xr"].source["spacing_from"] == {
        "DICOM ImagerPixelSpacing (0018,1164)": 1, "DICOM PixelSpacing (0028,0030)": 1, "none": 2}
    assert manifest.datasets["xr"].landmark_set.unit == "px" and manifest.rejected == 1
    with tarfile.open(out / manifest.shards[0].url) as tar:
        png = tar.extractfile("xr_train_a.png").read()
        record = json.loads(tar.extractfile("xr_train_a.json").read())
    stored = Image.open(io.BytesIO(png))
    assert stored.mode == "I;16" and stored.size == (20, 15) and np.asarray(stored).max() > 30000
    np.testing.assert_allclose(record["spacing_mm"], [0.2, 0.4])  # (0.1, 0.2) mm at half the size


@pytest.mark.parametrize("name", readers.READERS)
def test_every_reader_module_defines_the_reader_contract(name):
    reader = readers.load(name)
    assert isinstance(reader.OPTIONS, dict) and all(isinstance(k, str) for k in reader.OPTIONS)
    assert all(v is None or isinstance(v, str) for v in reader.OPTIONS.values())
    assert isinstance(reader.SPLIT_RULE, str) and reader.SPLIT_RULE
    assert reader.LANDMARK_SET is None or reader.LANDMARK_SET in registry.BUILTIN
    assert callable(reader.scan)
    assert callable(getattr(reader, "landmark_names", None)) == (reader.LANDMARK_SET is None)
