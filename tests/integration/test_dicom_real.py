"""The pixel path, spacing and per-file isolation on real DICOM files that pydicom and the
`pydicom-data` package ship (radiographs, CT, MR, NM, US; compressed and multi-frame): files no one
here wrote, read without network."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import CLI, run
from PIL import Image
from pydicom import uid
from pydicom.data import get_testdata_file, get_testdata_files

from medsapiens.data.pipeline import eval_example
from medsapiens.io import registry
from medsapiens.io.imageio import decode, dicom_spacing, is_dicom, to_float
from medsapiens.io.record import Rejection
from medsapiens.model import bundle as bundlelib
from medsapiens.model.landmark_model import ModelConfig

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns about the odd values its test files carry on purpose

LOSSLESS_TWINS = [  # (compressed, uncompressed) pairs shipped as such
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm"), ("RG3_J2KR.dcm", "RG3_UNCR.dcm"), ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
    ("693_J2KR.dcm", "693_UNCR.dcm"), ("JPEG2000.dcm", "JPEG2000_UNC.dcm"), ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"), ("MR_small_RLE.dcm", "MR_small.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb.dcm"), ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"), ("US1_J2KR.dcm", "US1_UNCR.dcm"),
]
DECODED_SYNTAXES = {  # every pixel transfer syntax in pydicom-data that pydicom decodes with pylibjpeg and friends
    uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.ExplicitVRBigEndian, uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLosslessSV1, uid.JPEGLSLossless,
    uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000, uid.RLELossless,
}


def real(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not installed: pip install pydicom-data"
    return path


def seen(name: str) -> np.ndarray:
    """What the model sees of a file, on 0-255."""
    return to_float(decode(real(name)))


def every_dicom_file() -> list[Path]:
    """Every DICOM file pydicom and pydicom-data ship: named .dcm or carrying the preamble (DICOMDIR trees)."""
    files = {Path(p) for p in get_testdata_files() if Path(p).is_file()}
    return sorted(p for p in files if is_dicom(p))


@pytest.mark.parametrize("name", ["RG3_UNCR.dcm", "RG1_UNCR.dcm"])  # 10-bit and 15-bit CR radiographs
def test_radiographs_reach_the_model_neither_black_nor_clipped(name):
    pixels = seen(name)
    assert 60 < pixels.mean() < 200  # stored values 0-1023 once reached the model as 0-4
    assert np.percentile(pixels, 98) - np.percentile(pixels, 2) > 120
    assert len(np.unique(np.rint(pixels))) > 200  # the grey levels in use: not squeezed into a few
    ds = pydicom.dcmread(real(name))
    low, high = float(ds.WindowCenter) - float(ds.WindowWidth) / 2, float(ds.WindowCenter) + float(ds.WindowWidth) / 2
    outside = ((ds.pixel_array <= low) | (ds.pixel_array >= high)).mean()  # RG3: its unexposed background, 44 %
    assert ((pixels >= 254.5) | (pixels <= 0.5)).mean() <= outside + 0.005  # saturated only where the window says


def test_other_modalities_fill_the_display_range():
    for name in ("693_UNCR.dcm", "MR2_UNCR.dcm", "JPEG-LL.dcm", "CT_small.dcm", "US1_UNCR.dcm", "examples_palette.dcm"):
        pixels = seen(name)
        assert pixels.max() - pixels.min() > 200 and pixels.mean() > 10, name


def test_monochrome1_is_shown_with_bone_bright():
    stored = pydicom.dcmread(real("RG1_UNCR.dcm")).pixel_array.astype(np.float64)  # MONOCHROME1: high = dark
    assert np.corrcoef(stored.ravel(), seen("RG1_UNCR.dcm").ravel())[0, 1] < -0.99
    ct = pydicom.dcmread(real("CT_small.dcm")).pixel_array.astype(np.float64)  # MONOCHROME2 keeps its polarity
    assert np.corrcoef(ct.ravel(), seen("CT_small.dcm").ravel())[0, 1] > 0.99


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "MR2_UNCR.dcm"])  # CT window 40/100 HU; MR rescale slope 3.77
def test_the_window_is_applied_after_the_rescale(name):
    ds = pydicom.dcmread(real(name))
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 65535  # PS3.3 C.11.2.1.2.1, LINEAR
    np.testing.assert_allclose(decode(real(name)).astype(np.float64), expected, atol=1)


def test_the_voi_lut_sequence_wins_over_stretching():
    ds = pydicom.dcmread(real("vlut_04.dcm"))
    lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
    expected = (lut[ds.pixel_array] - lut.min()) / (lut.max() - lut.min()) * 255
    np.testing.assert_allclose(decode(real("vlut_04.dcm")), expected, atol=0.5)


@pytest.mark.parametrize("compressed,plain", LOSSLESS_TWINS)
def test_lossless_compressed_files_decode_exactly_like_their_uncompressed_twins(compressed, plain):
    np.testing.assert_array_equal(decode(real(compressed)), decode(real(plain)))


def test_lossy_j2k_stays_close_to_the_original():
    assert np.abs(seen("RG1_J2KI.dcm") - seen("RG1_UNCI.dcm")).mean() < 1.0


def test_every_transfer_syntax_with_a_decoder_is_read():
    read, failed = set(), {}
    for path in every_dicom_file():
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        try:
            decode(str(path), frame=0 if "NumberOfFrames" in ds else None)
            read.add(syntax)
        except Rejection as exc:
            failed[path.name] = exc.detail
    assert DECODED_SYNTAXES <= read, (DECODED_SYNTAXES - read, failed)
    assert not [d for d in failed.values() if "plugin" in d and "missing" in d.lower()], failed  # no decoder absent


def test_zero_spacing_is_unknown_and_the_next_tag_is_tried():
    assert pydicom.dcmread(real("RG1_UNCR.dcm")).PixelSpacing == [0, 0]
    assert dicom_spacing(real("RG1_UNCR.dcm")) == (None, "none")
    spacing, source = dicom_spacing(real("6154"))  # a CR with ImagerPixelSpacing only
    assert spacing == (0.1, 0.1) and "ImagerPixelSpacing" in source
    spacing, source = dicom_spacing(real("6293"))  # PixelSpacing [row 0.545455, col 0.596847] -> (x, y)
    assert spacing == (0.596847, 0.545455) and "PixelSpacing" in source


def test_multi_frame_files_are_rejected_with_that_reason_or_read_by_frame():
    with pytest.raises(Rejection, match=r"multi-frame DICOM \(10 frames\); choose one with --frame N") as refused:
        decode(real("emri_small.dcm"))
    assert refused.value.reason == "multi_frame"
    frames = pydicom.dcmread(real("emri_small.dcm")).pixel_array
    third = decode(real("emri_small.dcm"), frame=2)
    assert third.shape == (64, 64) and np.corrcoef(third.ravel(), frames[2].ravel())[0, 1] > 0.999
    with pytest.raises(Rejection, match="no frame 10"):
        decode(real("emri_small.dcm"), frame=10)


def test_dicom_without_extension_is_recognised_by_its_preamble(tmp_path):
    plain = tmp_path / "IM000001"
    plain.write_bytes(Path(real("RG3_UNCR.dcm")).read_bytes())
    (tmp_path / "notes").write_text("not an image")
    assert is_dicom(plain) and not is_dicom(tmp_path / "notes")
    np.testing.assert_array_equal(decode(str(plain)), decode(real("RG3_UNCR.dcm")))


def sixteen_and_eight_bit(tmp_path: Path, sixteen: np.ndarray, eight: np.ndarray, name: str) -> tuple[Path, Path]:
    paths = tmp_path / f"{name}16.png", tmp_path / f"{name}8.png"
    Image.fromarray(sixteen.astype(np.uint16)).save(paths[0])
    Image.fromarray(eight.astype(np.uint8)).save(paths[1])
    return paths


def test_a_16_bit_png_and_its_8_bit_export_give_the_model_the_same_input(tmp_path):
    """The network input (warped to the demo's 128 x 96, normalised) of each pair is one 8-bit rounding apart,
    so a model's landmarks cannot differ by more than that rounding moves them. (An untrained model is no
    instrument here: its flat heatmaps move a peak for any change at all.)"""
    stored = pydicom.dcmread(real("RG3_UNCR.dcm")).pixel_array.astype(np.float64)  # 10 bits in 16: was black
    display = decode(real("RG3_UNCR.dcm"))  # the windowed display, 16 bits
    cases = [sixteen_and_eight_bit(tmp_path, stored, np.rint(stored * 255 / 1023), "raw"),
             sixteen_and_eight_bit(tmp_path, display, np.rint(display / 257), "display")]
    for png16, png8 in cases:
        a, b = (to_float(decode(str(p))) for p in (png16, png8))
        assert np.abs(a - b).max() <= 0.5 + 1e-3 and a.mean() > 60, png16.name  # not dark either
        inputs = [eval_example(image, {}, (96, 128), 1.25).image for image in (a, b)]
        assert inputs[0].shape == (3, 128, 96)
        assert (inputs[0] - inputs[1]).abs().max() <= (inputs[0] - eval_example(a + 0.5, {}, (96, 128), 1.25).image
                                                       ).abs().max() + 1e-5  # no more than half a grey level


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """An untrained sapiens_tiny head bundle at the demo's input size: enough to run the whole predict path."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(arch="sapiens_tiny", img_size=(128, 96), trunk_width=32)
    landmark_set = registry.get("head")
    model = model_cfg.build({"head": landmark_set.num_landmarks})
    return bundlelib.save(tmp_path_factory.mktemp("bundle"), model, bundlelib.Bundle(model_cfg, {"head": landmark_set}))


@pytest.fixture(scope="module")
def every_file_folder(tmp_path_factory) -> Path:
    """Every DICOM file pydicom and pydicom-data ship, flat under unique names (DICOMDIR trees keep no extension)."""
    folder = tmp_path_factory.mktemp("every")
    for path in every_dicom_file():
        parts = path.parts[path.parts.index("test_files") + 1:] if "test_files" in path.parts else (path.name,)
        (folder / "-".join(parts)).symlink_to(path)
    return folder


@pytest.mark.timeout(300)
def test_predict_over_every_file_accounts_for_each_and_exits_0(every_file_folder, tiny_bundle, tmp_path):
    out = tmp_path / "pred"
    proc = run([*CLI, "predict", "--bundle", str(tiny_bundle), "--out", str(out), "--overlays", "--no-flip-test",
                str(every_file_folder)], 240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted = json.loads((out / "predictions.json").read_text())["landmarks"]
    failures = {Path(f["image"]).name: f for f in json.loads((out / "failures.json").read_text())}
    names = {p.name for p in every_file_folder.iterdir()}
    assert {Path(n).stem for n in names - set(failures)} == set(predicted) and not set(predicted) & {
        Path(n).stem for n in failures}
    assert all(f["reason"] and f["detail"] for f in failures.values())
    assert failures["emri_small.dcm"]["reason"] == "multi_frame"
    assert "multi-frame DICOM (10 frames)" in failures["emri_small.dcm"]["detail"]
    assert "without pixel data" in failures["rtplan.dcm"]["detail"]
    assert len(predicted) > 100 and {"RG1_UNCR", "RG3_J2KR", "693_J2KR", "JPEG-LL", "US1_J2KI"} <= set(predicted)
    for compressed, plain in LOSSLESS_TWINS:  # same pixels, same landmarks
        assert predicted[Path(compressed).stem] == predicted[Path(plain).stem], compressed
    rg1 = json.loads((out / "RG1_UNCR.json").read_text())
    assert rg1["spacing_mm"] is None and "landmarks_mm" not in rg1  # PixelSpacing 0\0 is unknown, not 0 mm
    cr = json.loads((out / "dicomdirtests-77654033-CR1-6154.json").read_text())  # a DICOMDIR file, no extension
    assert cr["spacing_source"] == "DICOM ImagerPixelSpacing (0018,1164)" and cr["spacing_mm"] == [0.1, 0.1]
    overlay = np.asarray(Image.open(out / "overlays" / "RG1_UNCR.png").convert("L"), dtype=np.float64)
    assert 60 < overlay.mean() < 200  # the overlay shows the radiograph, not a black square


@pytest.mark.timeout(120)
def test_predict_spacing_and_frame_options(tiny_bundle, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("6293", "emri_small.dcm"):
        (inputs / name).symlink_to(real(name))
    out = tmp_path / "out"
    proc = run([*CLI, "predict", "--bundle", str(tiny_bundle), "--out", str(out), "--spacing", "0.2,0.25",
                "--frame", "3", str(inputs)], 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stem in ("6293", "emri_small"):  # --spacing wins over the tags; frame 3 of the 10 is read
        result = json.loads((out / f"{stem}.json").read_text())
        assert result["spacing_mm"] == [0.2, 0.25] and result["spacing_source"] == "--spacing"
        assert np.allclose(result["landmarks_mm"], np.array(result["landmarks"]) * [0.2, 0.25], atol=1e-2)
    for bad in ("0,0", "-1,2", "0.1", "a,b", "nan,1"):
        proc = run([*CLI, "predict", "--bundle", str(tiny_bundle), "--out", str(out), f"--spacing={bad}", str(inputs)], 60)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert "--spacing must be two positive numbers" in proc.stderr


def coco_over(folder: Path, names: list[str], spacing: dict[str, list[float]]) -> None:
    images, annotations = [], []
    for i, name in enumerate(names):
        entry = {"id": i, "file_name": name}
        if name in spacing:
            entry["spacing"] = spacing[name]
        images.append(entry)
        annotations.append({"image_id": i, "keypoints": [8, 8, 2, 12, 10, 2]})
    categories = [{"id": 1, "name": "xr", "keypoints": ["a", "b"]}]
    (folder / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


@pytest.mark.timeout(300)
def test_shards_build_over_every_file_rejects_per_file_and_records_spacing(every_file_folder, tmp_path):
    from medsapiens.io.manifest import load
    from medsapiens.launch.cli import main

    folder = tmp_path / "dicom"
    folder.mkdir()
    names = sorted(p.name for p in every_file_folder.iterdir())
    for name in names:
        (folder / name).symlink_to(every_file_folder / name)
    coco_over(folder, names, {"693_UNCR.dcm": [0.5, 0.5]})
    out = tmp_path / "shards"
    assert main(["shards", "build", "--source", f"xr:dicom={folder}", "--out", str(out), "--max-side", "64",
                 "--workers", "1", "--no-progress"]) == 0
    manifest = load(out)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    written = sum(manifest.datasets["xr"].splits.values())
    assert written + len(rejected) == len(names) and written > 100
    by_id = {r["id"]: r for r in rejected}
    assert by_id["emri_small"]["reason"] == "multi_frame" and "10 frames" in by_id["emri_small"]["detail"]
    spacing_from = manifest.datasets["xr"].source["spacing_from"]
    assert spacing_from["COCO image spacing [sx, sy]"] == 1  # the JSON wins over the CT's PixelSpacing tag
    assert spacing_from["none"] >= 1 and "RG1_UNCR" not in by_id  # zero spacing: written, spacing unknown
    record, png = stored(out, manifest, "RG3-J2KR")
    assert record["spacing_mm"] is None and to_float(png).mean() > 60  # stored bright enough to see
    assert stored(out, manifest, "693-UNCR")[0]["spacing_mm"][0] == pytest.approx(0.5 * 512 / 64)


def stored(out: Path, manifest, safe_id: str):
    """(record, pixels) of the sample with this id, whichever split it fell in."""
    import tarfile

    from medsapiens.io.imageio import decode_png

    for shard in manifest.shards:
        with tarfile.open(out / shard.url) as tar:
            name = next((n for n in tar.getnames() if n.endswith(f"_{safe_id}.json")), None)
            if name:
                return json.loads(tar.extractfile(name).read()), decode_png(tar.extractfile(name[:-5] + ".png").read())
    raise AssertionError(f"{safe_id} is in no shard")


def test_shared_outputs_are_readable_by_others_under_umask_022(every_file_folder, tiny_bundle, tmp_path):
    """manifest.json, rejected.jsonl, the stats files and a bundle's weights were written 0600."""
    import os

    from medsapiens.launch.cli import main

    old = os.umask(0o022)
    try:
        folder = tmp_path / "dicom"
        folder.mkdir()
        for name in ("RG3_UNCR.dcm", "emri_small.dcm"):
            (folder / name).symlink_to(every_file_folder / name)
        coco_over(folder, ["RG3_UNCR.dcm", "emri_small.dcm"], {})
        out = tmp_path / "shards"
        assert main(["shards", "build", "--source", f"xr:dicom={folder}", "--out", str(out), "--max-side", "64",
                     "--workers", "1", "--no-progress"]) == 0
        model, bundle = bundlelib.load(tiny_bundle)
        saved = bundlelib.save(tmp_path / "bundle", model, bundle)
    finally:
        os.umask(old)
    written = [*out.iterdir(), *saved.iterdir()]
    assert {"manifest.json", "rejected.jsonl", "model.safetensors", "config.json"} <= {p.name for p in written}
    assert any(p.name.endswith(".stats.json") for p in written) and any(p.suffix == ".tar" for p in written)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o644" for p in written}
