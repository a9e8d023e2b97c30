"""The timm-based Sapiens backbone against a plain-PyTorch reference written from the spec, and
checkpoint loading in every supported form."""
import math
import zipfile
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sapiens_checkpoints import released_state

from medsapiens.errors import CheckpointError, InputError
from medsapiens.model import ARCHS, build_backbone, convert_checkpoint, load_backbone, load_checkpoint, load_state
from medsapiens.model.weights import read_tensors

TINY = ARCHS["sapiens_tiny"]
IMG = (256, 192)


def reference_forward(state, images, arch):
    """The Sapiens ViT as the spec describes it, on the released keys, in float64."""
    sd = {k: v.double() for k, v in state.items()}
    c, heads = arch.embed_dim, arch.num_heads
    x = F.conv2d(images.double(), sd["patch_embed.projection.weight"], sd["patch_embed.projection.bias"],
                 stride=16, padding=2)
    batch, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    side = math.isqrt(sd["pos_embed"].shape[1] - 1)
    pos = sd["pos_embed"][:, 1:].reshape(1, side, side, c).permute(0, 3, 1, 2)
    pos = F.interpolate(pos.float(), size=(gh, gw), mode="bicubic", align_corners=False, antialias=False)
    x = x + pos.double().flatten(2).transpose(1, 2)

    def norm(t, prefix):
        return F.layer_norm(t, (c,), sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-6)

    for i in range(arch.depth):
        p = f"layers.{i}."
        qkv = F.linear(norm(x, p + "ln1"), sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(c // heads)).softmax(dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, -1, c)
        x = x + F.linear(attended, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        hidden = F.gelu(F.linear(norm(x, p + "ln2"), sd[p + "ffn.layers.0.0.weight"], sd[p + "ffn.layers.0.0.bias"]))
        x = x + F.linear(hidden, sd[p + "ffn.layers.1.weight"], sd[p + "ffn.layers.1.bias"])
    return norm(x, "ln1").transpose(1, 2).reshape(batch, c, gh, gw)


@pytest.fixture(scope="module")
def tiny_state():
    return released_state(TINY)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, *IMG, generator=torch.Generator().manual_seed(1))


def relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_loaded_backbone_matches_reference_forward(tmp_path, tiny_state, images):
    path = tmp_path / "sapiens_tiny_clean.pth"
    torch.save(tiny_state, path)
    backbone = load_backbone("sapiens_tiny", str(path), img_size=IMG).eval()
    with torch.no_grad():
        features = backbone(images)
    assert features.shape == (2, TINY.embed_dim, IMG[0] // 16, IMG[1] // 16)
    assert relative_error(features, reference_forward(tiny_state, images, TINY)) < 1e-5
    assert all(block.attn.fused_attn for block in backbone.blocks)
    # eps 1e-5 vs 1e-6 hardly moves the output at these activations: check it directly
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * TINY.depth + 1 and all(m.eps == 1e-6 for m in norms)


def test_every_checkpoint_form_loads_the_same_weights(tmp_path, tiny_state):
    flat = tmp_path / "flat.pth"
    torch.save(tiny_state, flat)
    head = {"head.final_layer.weight": torch.zeros(19, 768, 1, 1)}
    pose = tmp_path / "pose.pth"  # as mmengine saves it: numpy arrays and its own objects beside the weights
    meta = {"epoch": 210, "dataset_meta": {"sigmas": np.full(17, 0.025)}}
    torch.save({"meta": meta, "message_hub": Fraction(1, 3),
                "state_dict": {**{"backbone." + k: v for k, v in tiny_state.items()}, **head}}, pose)
    lora = tmp_path / "lora.pth"
    torch.save({"model": {"backbone.module." + k: v for k, v in tiny_state.items()}}, lora)
    released_safetensors = tmp_path / "released.safetensors"
    save_file(tiny_state, released_safetensors)

    expected = load_backbone("sapiens_tiny", str(flat), img_size=IMG).state_dict()
    for path in (pose, lora, released_safetensors):
        backbone = build_backbone("sapiens_tiny", IMG)
        report = load_checkpoint(backbone, path)
        assert report.complete, report.summary()
        assert_same_weights(backbone.state_dict(), expected)
        assert any(k.endswith("cls_token") for k in report.ignored)
    report = load_checkpoint(build_backbone("sapiens_tiny", IMG), pose)
    assert "head.final_layer.weight" in report.ignored
    assert any("restricted loader" in n and "fractions.Fraction" in n for n in report.notes)  # what was not loaded


def test_own_safetensors_forms_load_the_same_weights(tmp_path, tiny_state):
    """A converted file (64x64 grid in its metadata) and a bundle-like file of a whole model at the
    model's own non-square grid, with a decoder beside the backbone."""
    flat = tmp_path / "flat.pth"
    torch.save(tiny_state, flat)
    converted = tmp_path / "converted.safetensors"
    assert convert_checkpoint(flat, "sapiens_tiny", converted).complete
    tensors, metadata = read_tensors(converted)
    assert metadata["pos_embed_grid"] == "64x64" and metadata["source"] == "flat.pth"
    assert tensors["pos_embed"].shape == (1, 64 * 64, TINY.embed_dim) and "cls_token" not in tensors
    assert "blocks.0.attn.qkv.weight" in tensors

    expected = load_backbone("sapiens_tiny", str(flat), img_size=IMG).state_dict()
    assert_same_weights(load_backbone("sapiens_tiny", str(converted), img_size=IMG).state_dict(), expected)
    bundle = tmp_path / "model.safetensors"
    save_file({**{"backbone." + k: v for k, v in expected.items()}, "decoder.heads.head.bias": torch.zeros(19)},
              bundle)
    assert_same_weights(load_backbone("sapiens_tiny", str(bundle), img_size=IMG).state_dict(), expected)


def assert_same_weights(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_shape_mismatch_names_the_key_and_both_shapes(tiny_state):
    state = dict(tiny_state)
    state["layers.1.attn.qkv.weight"] = torch.zeros(3 * TINY.embed_dim, TINY.embed_dim + 1)
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.qkv\.weight.*\(576, 193\).*\(576, 192\)"):
        load_state(build_backbone("sapiens_tiny", IMG), state)
    state = dict(tiny_state, pos_embed=torch.zeros(1, 1000, TINY.embed_dim))
    with pytest.raises(ValueError, match=r"pos_embed has shape \(1, 1000, 192\)"):
        load_state(build_backbone("sapiens_tiny", IMG), state)


def test_missing_or_unexpected_backbone_keys_refuse_to_load(tmp_path, tiny_state):
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in tiny_state.items() if not k.startswith("layers.3.")}, missing)
    with pytest.raises(ValueError, match=r"missing \(12\): blocks\.3\.norm1\.weight"):
        load_backbone("sapiens_tiny", str(missing), img_size=IMG)
    deeper = tmp_path / "deeper.pth"
    torch.save({**tiny_state, "layers.4.ln1.weight": torch.ones(TINY.embed_dim)}, deeper)
    with pytest.raises(ValueError, match=r"unexpected \(1\): layers\.4\.ln1\.weight"):
        load_backbone("sapiens_tiny", str(deeper), img_size=IMG)


def test_grad_checkpointing_gives_the_same_gradients(images):
    torch.manual_seed(0)
    plain = build_backbone("sapiens_tiny", IMG)
    checkpointed = build_backbone("sapiens_tiny", IMG)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    for model in (plain, checkpointed):
        model(images).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_input_size_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="250x192"):
        build_backbone("sapiens_tiny", (250, 192))


@pytest.mark.parametrize("arch, billions", [("sapiens_0.3b", 0.30), ("sapiens_0.6b", 0.63),
                                            ("sapiens_1b", 1.13), ("sapiens_2b", 2.13)])
def test_full_sizes_take_the_released_keys(arch, billions):
    with torch.device("meta"):
        backbone = build_backbone(arch)
    report = load_state(backbone, released_state(ARCHS[arch], device="meta"))
    assert report.complete and report.loaded == list(backbone.state_dict())
    assert report.ignored == ["cls_token"]
    params = sum(p.numel() for p in backbone.parameters())
    assert abs(params / 1e9 - billions) / billions < 0.03
    assert backbone.grid_size == (64, 48)


@pytest.mark.parametrize("arch", ["sapiens_tiny", "sapiens2_tiny"])
@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["", "checkpointed"])
def test_compiled_regions_have_no_graph_break_and_identical_blocks_share_one_graph(monkeypatch, arch,
                                                                                   grad_checkpointing):
    """A graph break inside a compiled block splits it into pieces run between Python (lost speed on
    the GPU, silently); the blocks of one kind must share one graph, or start-up compiles each block."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from medsapiens.model.landmark_model import build_model

    compile_region = torch.nn.Module.compile  # dynamo's graphs alone: inductor's kernels take a minute on CPU
    monkeypatch.setattr(torch.nn.Module, "compile", lambda region: compile_region(region, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    model = build_model(arch, img_size=(64, 48), heads={"head": 4, "hand": 3}, trunk_width=16,
                        grad_checkpointing=grad_checkpointing).to(torch.bfloat16)  # as DeepSpeed's bf16 holds it
    model.compile_regions()
    try:
        outputs = model(torch.randn(4, 3, 64, 48, dtype=torch.bfloat16), torch.tensor([0, 1, 0, 1]))
        sum(out.heatmaps.float().sum() for out in outputs.values()).backward()
        block_kinds = len({repr(block) for block in model.backbone.blocks})
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == block_kinds + 1  # + the decoder trunk
    finally:
        torch._dynamo.reset()


def test_a_released_square_table_is_resized_for_a_grid_of_as_many_patches(tiny_state):
    """2048x512 has a 128x32 grid: 4096 patches, as the released 64x64 table (4097 rows with its cls slot)."""
    backbone = build_backbone("sapiens_tiny", (2048, 512))
    report = load_state(backbone, tiny_state)
    assert report.complete and "pos_embed resized from 64x64 to 128x32" in report.notes
    assert not torch.equal(backbone.pos_embed.data, tiny_state["pos_embed"][:, 1:])
    square = tiny_state["pos_embed"][:, 1:]  # without the cls slot 4096 rows are 64x64 or 128x32: refused
    with pytest.raises(ValueError, match=r"4096 tokens fit a 64x64 and a 128x32 grid; give the input size it was trained at"):
        load_state(build_backbone("sapiens_tiny", (2048, 512)), dict(tiny_state, pos_embed=square))


def test_a_portrait_table_that_records_no_grid_is_not_read_as_a_landscape_model_s(tiny_state):
    """A pose file's 64x48 table (3072 rows, no cls slot, no grid recorded) fits a 768x1024 model's 48x64
    grid token for token; read as the model's own, it would be laid out wrong without a word."""
    portrait = build_backbone("sapiens_tiny", (1024, 768))
    assert portrait.grid_size == (64, 48)
    pose = {**tiny_state, "pos_embed": torch.randn(1, 64 * 48, tiny_state["pos_embed"].shape[-1])}
    assert load_state(portrait, pose).complete and torch.equal(portrait.pos_embed.data, pose["pos_embed"])
    with pytest.raises(ValueError, match=r"3072 tokens fit a 48x64 and a 64x48 grid; give the input size it was trained at"):
        load_state(build_backbone("sapiens_tiny", (768, 1024)), pose)
    for size, grid in (((1536, 512), "96x32"), ((2048, 384), "128x24")):  # as many tokens: read row by row before
        with pytest.raises(ValueError, match=rf"3072 tokens fit a {grid} and a 64x48 grid; give the input size"):
            load_state(build_backbone("sapiens_tiny", size), pose)
    recorded = {"pos_embed_grid": "64x48"}
    report = load_state(build_backbone("sapiens_tiny", (1536, 512)), pose, recorded)
    assert report.complete and "pos_embed resized from 64x48 to 96x32" in report.notes
    with pytest.raises(ValueError, match=r"3072 tokens are neither the model's grid nor a square grid"):
        load_state(build_backbone("sapiens_tiny", (512, 384)), pose)  # 32x24: the table's grid is not guessed


def test_whole_number_weights_are_refused_not_cast(tiny_state):
    quantised = {k: (v * 100).round().to(torch.int8) if k == "ln1.weight" else v for k, v in tiny_state.items()}
    with pytest.raises(ValueError, match=r"'ln1.weight' holds torch.int8 values, not floating-point weights"):
        load_state(build_backbone("sapiens_tiny", IMG), quantised)


def test_a_checkpoint_file_that_cannot_be_read_is_one_line_naming_it(tmp_path, tiny_state):
    from medsapiens.errors import InputError

    good = tmp_path / "good.pth"
    torch.save(tiny_state, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    misnamed = tmp_path / "torch.safetensors"  # a torch file under a safetensors name: read by its content
    misnamed.write_bytes(good.read_bytes())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    for path in (truncated, junk):
        with pytest.raises(InputError, match=rf"^{path}: not a readable checkpoint.* cut short or damaged"):
            read_tensors(path)
    legacy = tmp_path / "legacy.pth"  # torch before 1.6: storages sized by the pickle, allocated before reading
    torch.save(tiny_state, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match=rf"^{legacy}: not a readable checkpoint: .* before 1.6 must be saved again"):
        read_tensors(legacy)
    deflated = tmp_path / "deflated.pth"  # 200 MB of zeros from a file of a few hundred kB
    torch.save({"pos_embed": torch.zeros(1, 12_500_000, 4)}, tmp_path / "large.pth")
    with zipfile.ZipFile(tmp_path / "large.pth") as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as out:
        for record in source.infolist():
            out.writestr(record.filename, source.read(record))
    with pytest.raises(InputError, match=rf"^{deflated}: refused: its records are compressed \(200,00"):
        read_tensors(deflated)
    assert read_tensors(misnamed)[0].keys() == tiny_state.keys()
    save_file(tiny_state, tmp_path / "st.safetensors", metadata={"pos_embed_grid": "64X64"})
    (tmp_path / "st.pth").write_bytes((tmp_path / "st.safetensors").read_bytes())  # and the other way round
    for path in (tmp_path / "st.safetensors", tmp_path / "st.pth"):
        with pytest.raises(InputError, match=rf"^{path}: metadata pos_embed_grid='64X64' is not HxW"):
            load_checkpoint(build_backbone("sapiens_tiny", IMG), path)
    with pytest.raises(InputError, match=r"pos_embed has shape \(4097, 192\), not \(1, tokens, channels\)"):
        load_state(build_backbone("sapiens_tiny", IMG), dict(tiny_state, pos_embed=tiny_state["pos_embed"][0]))


def test_a_tensor_repeating_one_value_a_file_of_kilobytes_makes_huge_is_refused_before_use(tmp_path):
    """A zero stride lets a few-KB file claim a (1, 4097, 10^6) pos_embed: resizing it took 750 MB (75 GB at
    10^8), and a release's trunk width read from such a file built a decoder of any size."""
    claimed = torch.zeros(1).expand(1, 4097, 1_000_000)
    torch.save({"pos_embed": claimed}, tmp_path / "huge.pth")
    assert (tmp_path / "huge.pth").stat().st_size < 2000
    with pytest.raises(InputError, match=r"entry 'pos_embed' claims 4,097,000,000 values over a storage of 4 bytes"):
        read_tensors(tmp_path / "huge.pth")
    torch.save({"pos_embed": torch.zeros(2, 4).to_sparse()}, tmp_path / "sparse.pth")
    with pytest.raises(InputError, match=r"entry 'pos_embed' is a torch.sparse_coo tensor, not dense weights"):
        read_tensors(tmp_path / "sparse.pth")


def test_two_file_keys_for_one_backbone_key_and_non_finite_weights_are_refused(tmp_path, tiny_state):
    """Of two copies of a weight (`backbone.` and `backbone.module.`) the last silently won; a NaN weight was
    converted and trained on, to fail later as a 'diverged' run."""
    both = {f"backbone.{k}": v for k, v in tiny_state.items()}
    both["backbone.module.layers.0.attn.qkv.weight"] = torch.zeros_like(tiny_state["layers.0.attn.qkv.weight"])
    with pytest.raises(InputError, match=r"'backbone.layers.0.attn.qkv.weight' and 'backbone.module.layers.0.attn"
                                         r".qkv.weight' are both the backbone's 'blocks.0.attn.qkv.weight'"):
        load_state(build_backbone("sapiens_tiny", IMG), both)
    broken = dict(tiny_state, **{"ln1.weight": torch.full_like(tiny_state["ln1.weight"], float("nan"))})
    torch.save(broken, tmp_path / "nan.pth")
    save_file(broken, tmp_path / "nan.safetensors")
    for path in (tmp_path / "nan.pth", tmp_path / "nan.safetensors"):
        with pytest.raises(CheckpointError, match=rf"^{path}: weight 'ln1.weight' is not finite .*: the file is damaged"):
            load_checkpoint(build_backbone("sapiens_tiny", IMG), path)
    with pytest.raises(CheckpointError, match=r"nan.pth: weight 'ln1.weight' is not finite"):
        convert_checkpoint(tmp_path / "nan.pth", "sapiens_tiny", tmp_path / "out.safetensors")
    masked = {**{f"backbone.{k}": v for k, v in tiny_state.items()}, "head.mask": torch.full((4,), float("-inf"))}
    assert load_state(build_backbone("sapiens_tiny", IMG), masked).complete  # the head: outside the backbone, unread


def test_a_loaded_checkpoint_s_report_is_printed(tmp_path, tiny_state, capsys):
    torch.save(tiny_state, tmp_path / "released.pth")
    load_backbone("sapiens_tiny", str(tmp_path / "released.pth"), img_size=IMG)
    err = capsys.readouterr().err
    assert f"{tmp_path / 'released.pth'}: loaded" in err and "pos_embed cls slot dropped" in err, err


def test_lora_adapters_alone_are_named_as_such(tmp_path, tiny_state):
    adapters = tmp_path / "best_EPE_epoch_199.pth"  # what a MedSapiens release holds of its backbone
    torch.save({"state_dict": {"backbone.module.layers.0.attn.qkv.lora_down.weight": torch.zeros(4, 192),
                               "backbone.module.pos_embed": tiny_state["pos_embed"]}}, adapters)
    with pytest.raises(ValueError, match=r"it holds LoRA adapters, not a whole backbone: .*model convert --from medsapiens"):
        load_backbone("sapiens_tiny", str(adapters), img_size=IMG)
