"""Sapiens2 against a reference forward written from the published architecture alone (float64, its
own key layout), with random weights in the released key layout; the released sizes' key sets and
parameter counts, as `model info` prints them."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from sapiens2_reference import random_released_state, reference, released_layout, rope_tables

from medsapiens.launch.cli import main
from medsapiens.model import ARCHS, build_backbone, count_params, load_backbone
from medsapiens.model.archs import get_arch
from medsapiens.model.weights import load_state

IMG = (64, 48)  # (H, W): a 4x3 token grid
RELEASED = ("sapiens2_0.1b", "sapiens2_0.4b", "sapiens2_0.8b", "sapiens2_1b", "sapiens2_5b")


def relative_error(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("rope_dtype", [torch.bfloat16, torch.float32], ids=["released bf16 RoPE", "fp32 RoPE"])
def test_the_backbone_matches_the_reference_forward(tmp_path, rope_dtype):
    arch = get_arch("sapiens2_tiny")  # 18 blocks: full attention in 0-7 and 10-17, grouped in 8 and 9
    state = random_released_state(arch)
    path = tmp_path / "sapiens2_tiny_pretrain.safetensors"
    save_file({f"backbone.{k}": v for k, v in state.items()}, str(path))  # a task checkpoint's prefix
    model = load_backbone(arch, str(path), img_size=IMG).eval()
    model.rope_embed.table_dtype = rope_dtype
    images = torch.randn(2, 3, *IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model(images)
    expected = reference(state, arch, images, rope_dtype if rope_dtype == torch.bfloat16 else torch.float64)
    assert features.shape == (2, arch.embed_dim, 4, 3)
    assert relative_error(features, expected) < 1e-4
    tables = model.rope_embed(4, 3)  # the released rounding, exactly
    assert torch.equal(torch.stack([tables.sin, tables.cos]),
                       torch.stack(rope_tables(4, 3, state["rope_embed.periods"], rope_dtype)).float())


def test_a_released_file_loads_with_nothing_missing_or_unexpected_and_names_what_is_off(tmp_path):
    arch = get_arch("sapiens2_tiny")
    state = random_released_state(arch)
    flat = tmp_path / "flat.safetensors"
    save_file({**state, "decode_head.conv.weight": torch.ones(2)}, str(flat))
    with pytest.raises(ValueError, match=r"unexpected \(1\): decode_head\.conv\.weight"):
        load_backbone(arch, str(flat), img_size=IMG)
    del state["blocks.9.attn.wk.weight"]
    short = tmp_path / "short.safetensors"
    save_file(state, str(short))
    with pytest.raises(ValueError, match=r"missing \(1\): blocks\.9\.attn\.wk\.weight"):
        load_backbone(arch, str(short), img_size=IMG)


def test_model_convert_writes_the_backbone_of_a_task_checkpoint(tmp_path, capsys):
    state = random_released_state(get_arch("sapiens2_tiny"))
    pose = tmp_path / "pose.safetensors"
    save_file({**{f"backbone.{k}": v for k, v in state.items()}, "decode_head.final.weight": torch.ones(3)}, str(pose))
    assert main(["model", "convert", str(pose), "--arch", "sapiens2_tiny", "--out", str(tmp_path / "b.safetensors")]) == 0
    assert load_file(str(tmp_path / "b.safetensors")).keys() == state.keys()
    assert main(["model", "convert", str(pose), "--arch", "sapiens2_0.1b", "--out", str(tmp_path / "c.safetensors")]) == 2
    assert main(["model", "convert", str(pose), "--arch", "sapiens2_tiny", "--out", str(tmp_path / "d.safetensors"),
                 "--img-size", "1024", "768"]) == 2
    assert "--img-size: a sapiens2_tiny checkpoint has no position table" in capsys.readouterr().err


@pytest.mark.parametrize("name", RELEASED)
def test_each_released_size_has_the_released_layout_and_parameter_count_and_loads_completely(name, capsys):
    arch = get_arch(name)
    with torch.device("meta"):
        model = build_backbone(arch)
    layout = released_layout(arch)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    parameters = sum(math.prod(s) for k, s in layout.items() if k != "rope_embed.periods")
    assert sum(p.numel() for p in model.parameters()) == parameters == count_params(arch, head_channels=0).backbone
    assert main(["model", "info", "--arch", name]) == 0
    assert f"backbone {parameters:,} " in capsys.readouterr().out
    # the loader's report on a pose checkpoint in the released layout (shapes only, on the meta device)
    with torch.device("meta"):
        pose = {f"backbone.{k}": torch.empty(s) for k, s in layout.items()} | {"decode_head.final.weight": torch.empty(3)}
    report = load_state(model, pose, source="pose.safetensors")
    assert report.complete and len(report.loaded) == len(layout) and report.ignored == ["decode_head.final.weight"]


def test_the_sizes_are_the_published_ones():
    dims = {n: (ARCHS[n].embed_dim, ARCHS[n].depth, ARCHS[n].num_heads, ARCHS[n].mlp_dim) for n in RELEASED}
    assert dims == {"sapiens2_0.1b": (768, 12, 12, 3072), "sapiens2_0.4b": (1024, 24, 16, 4096),
                    "sapiens2_0.8b": (1280, 32, 16, 5120), "sapiens2_1b": (1536, 40, 24, 6144),
                    "sapiens2_5b": (2432, 56, 32, 9728)}


def test_compiled_regions_keep_a_graph_for_every_variant_a_run_meets(monkeypatch):
    """Both kinds of Sapiens2 block share one forward, so they share dynamo's recompile budget: training,
    a last short batch, validation, and batch 1 in both modes must all stay compiled, not fall back to eager."""
    import torch._dynamo

    from medsapiens.model.landmark_model import build_model

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    compile_region = torch.nn.Module.compile  # dynamo's guards and limits alone; inductor's kernels take a minute on CPU
    monkeypatch.setattr(torch.nn.Module, "compile", lambda region: compile_region(region, backend="eager"))
    torch._dynamo.reset()
    model = build_model("sapiens2_tiny", img_size=(64, 48), heads={"head": 4}, trunk_width=16)
    model.compile_regions()
    try:
        for batch, training in ((4, True), (3, True), (4, False), (3, False), (1, False), (1, True), (2, False)):
            model.train(training)
            with torch.set_grad_enabled(training):
                heatmaps = model(torch.randn(batch, 3, 64, 48), torch.zeros(batch, dtype=torch.long))["head"].heatmaps
                if training:
                    heatmaps.sum().backward()
    finally:
        torch._dynamo.reset()
