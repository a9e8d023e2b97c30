"""A bundle from elsewhere is read field by field: whatever is wrong in its config.json or its
weights' header is one line naming the file and the field, before a model is built from it."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from medsapiens.errors import InputError
from medsapiens.io.registry import BUILTIN
from medsapiens.model import bundle as bundlelib
from medsapiens.model.landmark_model import ModelConfig

CALIBRATION = {"method": "split conformal", "coverage": 0.9, "split": "val", "images": 12, "unit": "mm",
               "radii": [1.5] * 19}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle")
    model_cfg = ModelConfig(arch="sapiens_tiny", img_size=(64, 48), trunk_width=8)
    torch.manual_seed(0)
    model = model_cfg.build({"head": 19})
    bundlelib.save(path, model, bundlelib.Bundle(model_cfg, {"head": BUILTIN["head"]}, provenance={"stage": "test"},
                                                 calibration={"head": CALIBRATION}))
    return path


def edited(saved, tmp_path, edit=None, weights=None):
    config = json.loads((saved / bundlelib.CONFIG).read_text())
    text = edit(config) if edit else None
    (tmp_path / bundlelib.CONFIG).write_text(text if isinstance(text, str) else json.dumps(config))
    state = load_file(saved / bundlelib.WEIGHTS)
    if weights:
        weights(state)
    save_file(state, tmp_path / bundlelib.WEIGHTS)
    return tmp_path


def test_the_saved_bundle_loads_with_its_calibration(saved):
    model, bundle = bundlelib.load(saved)
    assert bundle.calibration["head"]["radii"] == [1.5] * 19 and bundle.heads == {"head": 19}


@pytest.mark.parametrize("edit, message", [
    (lambda d: "{bad", "not valid JSON"),
    (lambda d: "[" * 100000 + "]" * 100000, "nested too deep"),
    (lambda d: d.pop("model"), "missing key 'model'"),
    (lambda d: d.update(notes="x"), "unknown key(s) ['notes']"),
    (lambda d: d["model"].update(foo=1), "unknown key(s) model.foo"),
    (lambda d: d["model"].update(img_size="64x48"), "model.img_size must be [H, W]"),
    (lambda d: d["model"].update(img_size=[64.0, 48.0]), "must be positive multiples of 16"),
    (lambda d: d["model"].update(img_size=[160000, 160000]), "a side over 8192 px"),
    (lambda d: d["model"].update(trunk_width="8"), "model.trunk_width must be a whole number"),
    (lambda d: d["codec"].update(margin=0), "codec.margin must be a number from 1 to 4, got 0"),
    (lambda d: d["codec"].update(margin=1e300), "codec.margin must be a number from 1 to 4, got 1e+300"),
    (lambda d: d["codec"].update(sigma="2"), "codec: sigma must be a positive number"),
    (lambda d: d["codec"].update(blur_kernel=10), "blur_kernel must be an odd number"),
    (lambda d: d["landmark_sets"]["head"].update(unit="furlong"), "unit must be 'mm' or 'px'"),
    (lambda d: d["landmark_sets"]["head"].update(extra="kept?"), "landmark set 'head': unknown key(s) ['extra']"),
    (lambda d: d["landmark_sets"]["head"].update(sdr_radii="2"), "sdr_radii must be a list"),
    (lambda d: d["landmark_sets"]["head"].update(native_spacing_mm=-0.1), "native_spacing_mm must be null or a positive"),
    (lambda d: d["landmark_sets"]["head"].update(flip_pairs=[[0, 99]]), "flip pair (0, 99) outside 0..18"),
    (lambda d: d["landmark_sets"]["head"].update(flip_pairs=[[0, 1], [1, 2]]), "put landmark 1 in two pairs"),
    (lambda d: d["landmark_sets"].update(head=["x"]), "a landmark set must be an object, got ['x']"),
    (lambda d: d["landmark_sets"]["head"].__delitem__("unit"), "landmark set 'head': missing key(s) ['unit']"),
    (lambda d: d["landmark_sets"]["head"].update(normalization={"rule": "frame"}), "normalization must be null, "),
    (lambda d: d["landmark_sets"]["head"].update(normalization={"rule": "wrist_width", "mm": 50, "landmarks": [1, 19]}),
     "normalization must be null, "),
    (lambda d: d["calibration"]["head"].update(radii=[float("nan")] * 19), "radii must be 19 finite non-negative"),
    (lambda d: d["calibration"]["head"].update(radii=[1.0] * 3), "radii must be 19 finite non-negative"),
    (lambda d: d["calibration"]["head"].update(unit="px"), "unit 'px', but the landmark set's errors are in 'mm'"),
    (lambda d: d["calibration"].update(hand=CALIBRATION), "calibration of 'hand', which is not one of its heads"),
    (lambda d: d["model"]["heads"].update(head=5), "heads {'head': 5} disagree with the landmark sets"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_a_config_field_out_of_its_contract_is_one_line_naming_the_file(saved, tmp_path, edit, message):
    with pytest.raises(InputError) as refused:
        bundlelib.load(edited(saved, tmp_path, edit))
    assert str(refused.value).startswith(f"{tmp_path / bundlelib.CONFIG}: ") and message in str(refused.value)


@pytest.mark.parametrize("edit, weights, message", [
    (None, lambda s: s.update({k: v.to(torch.int64) for k, v in s.items()}), "not floating point"),
    (lambda d: d["model"].update(trunk_width=16), None, "has shape [19, 8, 1, 1], its config's model [19, 16, 1, 1]"),
    (lambda d: d["model"].update(img_size=[128, 96]), None, "'backbone.pos_embed' has shape [1, 12, 192]"),
    (lambda d: d["model"].update(arch="sapiens2_tiny"), None, "does not match its config: missing ['backbone"),
    (None, lambda s: s.pop("decoder.heads.head.bias"), "missing ['decoder.heads.head.bias']"),
], ids=["integer weights", "trunk width", "input size", "architecture", "a tensor missing"])
def test_weights_that_do_not_fit_the_config_are_refused_from_the_header(saved, tmp_path, monkeypatch, edit, weights,
                                                                       message):
    path = edited(saved, tmp_path, edit, weights)
    built = []
    monkeypatch.setattr(ModelConfig, "build", lambda cfg, heads: built_on(cfg, heads, built))
    with pytest.raises(InputError) as refused:
        bundlelib.load(path)
    assert str(refused.value).startswith(f"{path / bundlelib.WEIGHTS}") and message in str(refused.value)
    assert built == ["meta"]  # compared with a model on the meta device: no memory, no weights read


def built_on(cfg, heads, built):
    from medsapiens.model.landmark_model import build_model

    built.append(torch.empty(0).device.type)
    return build_model(cfg.arch, cfg.img_size, heads, cfg.trunk_width, cfg.checkpoint, cfg.grad_checkpointing)


def test_a_damaged_weights_or_config_file_is_one_line(saved, tmp_path):
    path = edited(saved, tmp_path)
    (path / bundlelib.WEIGHTS).write_bytes(b"\0" * 1000)
    with pytest.raises(InputError, match="model.safetensors: not a readable safetensors file"):
        bundlelib.load(path)

    config = path / bundlelib.CONFIG
    config.write_bytes(config.read_bytes().replace(b'"head"', b'"h\xe9ad"', 1))  # Latin-1, not UTF-8
    with pytest.raises(InputError, match=rf"^{config}: not valid JSON \(.*can't decode byte 0xe9"):
        bundlelib.load(path)
    config.unlink()
    config.mkdir()
    with pytest.raises(InputError, match=rf"^{config}: cannot be read"):
        bundlelib.load(path)


def test_a_checkpoint_path_in_the_config_is_never_read(saved, tmp_path):
    path = edited(saved, tmp_path, lambda d: d["model"].update(checkpoint="/no/such/weights.safetensors"))
    _, bundle = bundlelib.load(path)
    assert bundle.model.checkpoint is None


def test_an_onnx_export_carries_the_calibration_of_its_heads_where_it_holds(saved, capsys):
    from medsapiens.deploy.export import metadata

    bundle = bundlelib.read_config(saved)
    bundle.calibration = {"head": {**CALIBRATION, "flip_test": True}, "leg": {**CALIBRATION, "flip_test": True}}
    assert metadata(bundle, ["head"], True, "b")["calibration"] == {"head": bundle.calibration["head"]}
    assert metadata(bundle, ["head"], False, "b")["calibration"] == {}  # radii measured with flip test
    assert "note: the 'head' radii were calibrated with flip test and do not hold without it" in capsys.readouterr().err
    bundle.calibration = {"head": CALIBRATION}  # a record that does not say how it was calibrated is kept
    assert metadata(bundle, ["head"], False, "b")["calibration"] == {"head": CALIBRATION}
