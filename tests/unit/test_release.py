"""`medsapiens model convert --from medsapiens`: released MedSapiens checkpoints -> a bundle."""
import builtins
import os
import pickle
import struct
import sys
import tracemalloc
import types
import zipfile

import numpy as np
import pytest
import torch
from sapiens_checkpoints import released_state

from medsapiens.launch.cli import main
from medsapiens.model import ARCHS, load_backbone
from medsapiens.model import bundle as bundlelib
from medsapiens.model.torch_files import read_checkpoint

ARCH = ARCHS["sapiens_tiny"]
IMG = (64, 48)
WIDTH = 16
SPANS = {"head": (0, 19), "chest": (19, 25), "hand": (25, 62), "leg": (62, 88)}


def medsapiens_state(channels=88, seed=1, arch=ARCH, width=WIDTH):
    """Random tensors in exactly the released MedSapiens key format (LoRA r4 on qkv, r8 on proj)."""
    gen = torch.Generator().manual_seed(seed)
    c = arch.embed_dim

    def rand(*shape):
        return torch.randn(shape, generator=gen) * 0.05

    state = {}
    for i in range(arch.depth):
        p = f"backbone.module.layers.{i}.attn."
        state.update({p + "qkv.lora_down.weight": rand(4, c), p + "qkv.lora_up.weight": rand(3 * c, 4),
                      p + "proj.lora_down.weight": rand(8, c), p + "proj.lora_up.weight": rand(c, 8)})
    state.update({
        "head.deconv_layers.0.weight": rand(c, width, 4, 4), "head.deconv_layers.3.weight": rand(width, width, 4, 4),
        "head.conv_layers.0.weight": rand(width, width, 1, 1), "head.conv_layers.0.bias": rand(width),
        "head.conv_layers.3.weight": rand(width, width, 1, 1), "head.conv_layers.3.bias": rand(width),
        "head.final_layer.weight": rand(channels, width, 1, 1), "head.final_layer.bias": rand(channels),
    })
    return state


def save_mmengine(path, state, **extra):
    torch.save({"meta": {"epoch": 199, "iter": 4000, "mmengine_version": "0.10.3"}, "state_dict": state, **extra}, path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "sapiens_tiny_epoch_1600_clean.pth"
    torch.save(released_state(ARCH), path)
    return path


def convert(checkpoint, base, out, *extra):
    return main(["model", "convert", "--from", "medsapiens", str(checkpoint), "--base", str(base), "--out", str(out),
                 "--arch", ARCH.name, "--img-size", *map(str, IMG), *extra])


def test_multi_dataset_checkpoint_becomes_a_four_head_bundle(tmp_path, base, capsys):
    state = medsapiens_state()
    checkpoint = save_mmengine(tmp_path / "best_EPE_epoch_199.pth", state)
    assert convert(checkpoint, base, tmp_path / "bundle") == 0
    assert "merged 8 LoRA deltas" in capsys.readouterr().out
    model, bundle = bundlelib.load(tmp_path / "bundle")
    weights = model.state_dict()

    assert list(bundle.heads) == list(SPANS) and bundle.heads == {"head": 19, "chest": 6, "hand": 37, "leg": 26}
    final_w, final_b = state["head.final_layer.weight"], state["head.final_layer.bias"]
    for dataset, (a, b) in SPANS.items():
        assert torch.equal(weights[f"decoder.heads.{dataset}.weight"], final_w[a:b])
        assert torch.equal(weights[f"decoder.heads.{dataset}.bias"], final_b[a:b])
    for ours, theirs in {"trunk.0.conv.weight": "deconv_layers.0.weight", "trunk.1.conv.weight": "deconv_layers.3.weight",
                         "trunk.2.conv.weight": "conv_layers.0.weight", "trunk.2.conv.bias": "conv_layers.0.bias",
                         "trunk.3.conv.weight": "conv_layers.3.weight", "trunk.3.conv.bias": "conv_layers.3.bias"}.items():
        assert torch.equal(weights[f"decoder.{ours}"], state[f"head.{theirs}"])

    reference = load_backbone(ARCH, str(base), IMG).state_dict()
    merged = set()
    for i in range(ARCH.depth):
        for target in ("qkv", "proj"):
            lora = f"backbone.module.layers.{i}.attn.{target}."
            key = f"blocks.{i}.attn.{target}.weight"
            delta = state[lora + "lora_up.weight"] @ state[lora + "lora_down.weight"] * 1.0
            torch.testing.assert_close(weights["backbone." + key], reference[key] + delta, rtol=0, atol=1e-6)
            assert not torch.allclose(weights["backbone." + key], reference[key], atol=1e-4)  # the delta is there
            merged.add(key)
    for key, tensor in reference.items():
        if key not in merged:
            assert torch.equal(weights["backbone." + key], tensor), key
    assert weights["backbone.pos_embed"].shape == (1, 12, ARCH.embed_dim)  # 64x64 grid resized to 4x3

    assert bundle.model.arch == ARCH.name and bundle.model.img_size == IMG and bundle.model.trunk_width == WIDTH
    assert (bundle.codec.sigma, bundle.codec.margin, bundle.codec.blur_kernel) == (3.0, 1.25, 11)
    p = bundle.provenance
    assert p["stage"] == "medsapiens-release" and p["lora_merged"] == 16 and p["final_layer_channels"] == 88
    assert p["source"]["path"].endswith("best_EPE_epoch_199.pth") and len(p["source"]["sha256"]) == 64
    assert p["base"]["path"].endswith("_clean.pth") and len(p["base"]["sha256"]) == 64
    assert p["heads"]["hand"] == {"channels": [25, 62]} and p["checkpoint_meta"]["epoch"] == 199
    with torch.no_grad():
        assert model.heatmaps(torch.randn(2, 3, *IMG), "leg").shape == (2, 26, 16, 12)


def test_a_bundle_is_replaced_only_with_force_and_never_written_into_other_folders(tmp_path, base, capsys):
    checkpoint, out = save_mmengine(tmp_path / "best_EPE_epoch_199.pth", medsapiens_state()), tmp_path / "bundle"
    assert convert(checkpoint, base, out, "--dataset", "leg") == 0
    written = (out / bundlelib.CONFIG).read_text()
    assert convert(checkpoint, base, out) == 2
    assert f"--out {out} already holds config.json and model.safetensors: pass --force" in capsys.readouterr().err
    assert (out / bundlelib.CONFIG).read_text() == written
    assert convert(checkpoint, base, out, "--force") == 0 and list(bundlelib.load(out)[1].heads) == list(SPANS)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    assert convert(checkpoint, base, run_dir, "--force") == 2
    assert f"--out {run_dir} holds run.json, not a bundle's files" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"]
    assert main(["model", "convert", "--from", "medsapiens", str(checkpoint), "--base", str(base), "--out",
                 str(tmp_path / "b2"), "--arch", "sapiens2_0.4b"]) == 2
    assert "--arch sapiens2_0.4b: the MedSapiens releases are LoRA adapters of a Sapiens (v1)" in capsys.readouterr().err


def test_single_dataset_checkpoints_need_their_dataset(tmp_path, base, capsys):
    state = medsapiens_state(channels=26)
    checkpoint = save_mmengine(tmp_path / "legs_best_EPE_epoch_208.pth", state)
    assert convert(checkpoint, base, tmp_path / "no_dataset") == 2
    assert "26 channels" in capsys.readouterr().err and not (tmp_path / "no_dataset").exists()
    assert convert(checkpoint, base, tmp_path / "wrong", "--dataset", "head") == 2
    assert "'head' has 19 landmarks" in capsys.readouterr().err
    assert convert(checkpoint, base, tmp_path / "leg", "--dataset", "leg") == 0
    model, bundle = bundlelib.load(tmp_path / "leg")
    assert bundle.heads == {"leg": 26}
    assert torch.equal(model.state_dict()["decoder.heads.leg.weight"], state["head.final_layer.weight"])

    multi = save_mmengine(tmp_path / "multi.pth", medsapiens_state())  # one head taken from the 88
    assert convert(multi, base, tmp_path / "hand", "--dataset", "hand") == 0
    model, bundle = bundlelib.load(tmp_path / "hand")
    assert bundle.heads == {"hand": 37}
    assert torch.equal(model.state_dict()["decoder.heads.hand.bias"], medsapiens_state()["head.final_layer.bias"][25:62])


def test_wrong_shapes_and_keys_are_refused_by_name(tmp_path, base, capsys):
    def refused(state, name):
        checkpoint = save_mmengine(tmp_path / f"{name}.pth", state)
        assert convert(checkpoint, base, tmp_path / name) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and not (tmp_path / name).exists()
        return err

    state = medsapiens_state()
    state["backbone.module.layers.2.attn.proj.lora_up.weight"] = torch.zeros(ARCH.embed_dim, 4)
    assert "'backbone.module.layers.2.attn.proj.lora_up.weight' has shape (192, 4), expected (192, 8)" in refused(
        state, "shape")
    state = medsapiens_state()
    state["head.deconv_layers.3.weight"] = torch.zeros(WIDTH, WIDTH, 3, 3)
    assert "'head.deconv_layers.3.weight' has shape" in refused(state, "deconv")
    state = medsapiens_state()
    del state["backbone.module.layers.3.attn.qkv.lora_down.weight"]
    assert "missing 'backbone.module.layers.3.attn.qkv.lora_down.weight'" in refused(state, "missing")
    state = medsapiens_state()
    state["backbone.module.layers.4.attn.qkv.lora_down.weight"] = torch.zeros(4, ARCH.embed_dim)
    assert "unexpected 'backbone.module.layers.4.attn.qkv.lora_down.weight'" in refused(state, "unexpected")
    assert "not a MedSapiens checkpoint" in refused(released_state(ARCH), "plain_sapiens")
    state = medsapiens_state()
    state["backbone.module.layers.1.attn.qkv.lora_up.weight"][0, 0] = float("nan")  # merged, a NaN backbone weight
    assert ("weight 'backbone.module.layers.1.attn.qkv.lora_up.weight' is not finite (NaN or infinity): the file is "
            "damaged") in refused(state, "nan")


def test_user_mistakes_are_one_line_errors(tmp_path, base, capsys):
    checkpoint = save_mmengine(tmp_path / "ok.pth", medsapiens_state())
    assert convert(tmp_path / "absent.pth", base, tmp_path / "b") == 2
    assert "absent.pth: no such file" in capsys.readouterr().err
    assert convert(checkpoint, tmp_path / "absent_base.pth", tmp_path / "b") == 2
    assert "absent_base.pth: no such file" in capsys.readouterr().err
    small = tmp_path / "sapiens_small_clean.pth"
    torch.save(released_state(ARCHS["sapiens_small"]), small)
    assert convert(checkpoint, small, tmp_path / "b") == 2  # a base of another size
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "base checkpoint" in err and "in the checkpoint but" in err
    assert main(["model", "convert", "--from", "medsapiens", str(checkpoint), "--out", str(tmp_path / "b")]) == 2
    assert "needs --base" in capsys.readouterr().err
    assert main(["model", "convert", str(checkpoint), "--base", str(base), "--arch", "sapiens_tiny",
                 "--out", str(tmp_path / "b")]) == 2
    assert "--base: only with --from medsapiens" in capsys.readouterr().err
    assert main(["model", "convert", str(base), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--arch is required" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    deflated = tmp_path / "deflated.pth"  # its records compressed: loading would allocate what they inflate to
    with zipfile.ZipFile(checkpoint) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as out:
        for record in source.infolist():
            out.writestr(record.filename, source.read(record))
    assert convert(deflated, base, tmp_path / "b") == 2
    assert f"{deflated}: refused: its records are compressed" in capsys.readouterr().err


class HistoryBuffer:
    """Pickled under mmengine's name (a stand-in module exists only while saving)."""

    def __init__(self):
        self._log_history = np.array([0.5, 0.25])
        self._count = np.int64(2)


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpensFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def test_unsafe_pickles_convert_without_running_anything(tmp_path, base, monkeypatch):
    markers = [tmp_path / "ran_os_system", tmp_path / "ran_open"]
    fake = types.ModuleType("mmengine.logging.history_buffer")
    HistoryBuffer.__module__ = fake.__name__
    fake.HistoryBuffer = HistoryBuffer
    with monkeypatch.context() as m:
        for parent in ("mmengine", "mmengine.logging"):
            m.setitem(sys.modules, parent, types.ModuleType(parent))
        m.setitem(sys.modules, fake.__name__, fake)
        checkpoint = save_mmengine(
            tmp_path / "mmengine.pth", medsapiens_state(),
            meta={"epoch": 199, "seed": np.int64(0), "dataset_meta": {"sigmas": np.ones(3)}},
            message_hub={"log_scalars": {"train/loss": HistoryBuffer()},
                         "runtime_info": {"a": RunsCommand(markers[0]), "b": OpensFile(markers[1])}},
        )
    assert fake.__name__ not in sys.modules
    with pytest.raises(pickle.UnpicklingError):  # weights_only refuses it: the fallback is what reads it
        torch.load(checkpoint, weights_only=True)
    assert convert(checkpoint, base, tmp_path / "bundle") == 0
    assert not any(m.exists() for m in markers)
    assert fake.__name__ not in sys.modules and "mmengine" not in sys.modules
    model, bundle = bundlelib.load(tmp_path / "bundle")
    loader = bundle.provenance["loader"]
    assert "restricted loader" in loader and "posix.system" in loader and "io.open" in loader
    assert "mmengine.logging.history_buffer.HistoryBuffer" in loader and "Unsupported global" in loader
    assert torch.equal(model.state_dict()["decoder.heads.chest.bias"], medsapiens_state()["head.final_layer.bias"][19:25])


def with_pickle(tmp_path, name: str, pickled: bytes):
    """A torch file whose data.pkl is `pickled`."""
    plain, path = tmp_path / "plain.pth", tmp_path / name
    torch.save({}, plain)
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w") as out:
        for record in source.infolist():
            out.writestr(record, pickled if record.filename.endswith("data.pkl") else source.read(record))
    return path


def test_a_damaged_pickle_is_called_unreadable_with_what_each_loader_said(tmp_path, base, capsys):
    damaged = with_pickle(tmp_path, "damaged.pth", b"\x80\x02}q\x00\xff.")  # a byte that is no opcode
    assert convert(damaged, base, tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{damaged}: not a readable checkpoint (weights_only: " in err
    assert "the restricted loader: KeyError: 255" in err and "it is damaged" in err
    assert not (tmp_path / "b").exists()


def test_a_pickle_naming_a_huge_memo_index_allocates_nothing_for_it(tmp_path):
    """The restricted loader reads what weights_only refused: a few bytes asking the unpickler to
    remember an object at index 2^26 must not make it allocate a table of that many slots."""
    pickled = b"\x80\x02cnumpy\nfoo\n)Rr" + struct.pack("<I", 1 << 26) + b"0}."  # global, call, LONG_BINPUT
    hostile = with_pickle(tmp_path, "memo.pth", pickled)
    tracemalloc.start()
    obj, loader = read_checkpoint(hostile)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert obj == {} and "numpy.foo" in loader
    assert peak < 64 * 2**20  # C's unpickler sizes its memo table by the index: 1 GiB here


def test_many_distinct_globals_cost_a_bounded_amount_of_memory(tmp_path):
    """A placeholder class costs about 2 KB, a global's name about 20 bytes of the file: past
    NAMED_PLACEHOLDERS names one shared class stands in, so memory stays proportional to the file."""
    calls = b"".join(b"cfake\nname%d\n)R" % i for i in range(20_000))  # global, empty args, call: 20,000 names
    path = with_pickle(tmp_path, "many.pth", b"\x80\x02(" + calls + b"l.")  # MARK ... LIST
    tracemalloc.start()
    obj, loader = read_checkpoint(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(obj) == 20_000 and "20000 global(s) left as inert placeholders: fake.name0, " in loader
    assert len(loader) < 2000 and repr(obj[0]) == "<not loaded: fake.name0>"
    assert peak < 40 * path.stat().st_size  # about 24 times here; a class per name took over 120 times
