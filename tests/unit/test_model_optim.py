"""Layer-decay parameter groups, and LoRA: what trains, what stays frozen, merging for export."""
import pytest
import torch

from medsapiens.model import apply_lora, build_model, count_trainable, merge_lora, param_groups
from medsapiens.model.backbone import SapiensViT

IMG = (64, 48)
DEPTH = 4  # sapiens_tiny
C = 192


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return build_model("sapiens_tiny", IMG, {"head": 19, "leg": 26}, trunk_width=16)


def group_of(groups):
    """parameter id -> its group"""
    return {id(p): g for g in groups for p in g["params"]}


def test_layer_decay_and_no_decay_membership(model):
    groups = param_groups(model, weight_decay=0.1, layer_decay=0.85)
    assert all(g["params"] for g in groups)
    lookup = group_of(groups)
    named = dict(model.named_parameters())
    assert len(lookup) == len(named)  # every trainable parameter once

    expected_layer = {"backbone.pos_embed": 0, "backbone.patch_embed.proj.weight": 0,
                      "backbone.blocks.0.attn.qkv.weight": 1, "backbone.blocks.3.mlp.fc2.bias": 4,
                      "backbone.norm.weight": DEPTH + 1, "decoder.trunk.0.conv.weight": DEPTH + 1,
                      "decoder.heads.leg.weight": DEPTH + 1}
    for name, layer in expected_layer.items():
        assert lookup[id(named[name])]["lr_scale"] == pytest.approx(0.85 ** (DEPTH + 1 - layer)), name

    no_decay = {"backbone.pos_embed", "backbone.patch_embed.proj.bias", "backbone.blocks.2.norm1.weight",
                "backbone.blocks.2.attn.qkv.bias", "backbone.norm.bias", "decoder.heads.head.bias"}
    decay = {"backbone.patch_embed.proj.weight", "backbone.blocks.2.attn.proj.weight", "decoder.trunk.1.conv.weight"}
    for name in no_decay:
        assert lookup[id(named[name])]["weight_decay"] == 0.0, name
    for name in decay:
        assert lookup[id(named[name])]["weight_decay"] == 0.1, name
    assert lookup[id(named["decoder.heads.head.weight"])]["part"] == "decoder"
    assert lookup[id(named["backbone.norm.weight"])]["part"] == "backbone"
    assert len({g["name"] for g in groups}) == len(groups)


def lora_params_by_hand(depth, c):
    qkv = 4 * c + 3 * c * 4  # A: (4, C), B: (3C, 4)
    proj = 8 * c + c * 8  # A: (8, C), B: (C, 8)
    return depth * (qkv + proj)


def test_lora_trains_only_adapters_and_decoder(model):
    decoder_params = sum(p.numel() for p in model.decoder.parameters())
    apply_lora(model)
    assert count_trainable(model) == lora_params_by_hand(DEPTH, C) + decoder_params
    backbone = model.backbone.get_base_model()
    assert type(backbone.patch_embed.proj) is torch.nn.Conv2d and not backbone.patch_embed.proj.weight.requires_grad
    assert backbone.blocks[0].attn.qkv.lora_A["default"].out_features == 4
    assert backbone.blocks[0].attn.proj.lora_A["default"].out_features == 8
    assert all(b.attn.qkv.scaling["default"] == 1.0 and b.attn.proj.scaling["default"] == 1.0
               for b in backbone.blocks)
    assert all(b.attn.qkv.lora_B["default"].weight.abs().sum() == 0 for b in backbone.blocks)

    groups = param_groups(model, weight_decay=0.1)
    grouped = [p for g in groups for p in g["params"]]
    assert sum(p.numel() for p in grouped) == count_trainable(model)
    # every adapter, in every block, at the base lr (MedSapiens), counted by hand
    at_base_lr = sum(p.numel() for g in groups if g["part"] == "lora" and g["lr_scale"] == 1.0 for p in g["params"])
    assert at_base_lr == lora_params_by_hand(DEPTH, C)
    assert {g["part"] for g in groups} == {"lora", "decoder"}
    named = dict(model.named_parameters())
    qkv_a = named["backbone.base_model.model.blocks.0.attn.qkv.lora_A.default.weight"]
    assert group_of(groups)[id(qkv_a)]["lr_scale"] == 1.0


def test_merged_lora_model_reproduces_the_lora_model(model):
    images = torch.randn(2, 3, *IMG)
    index = torch.tensor([0, 1])
    plain_keys = list(model.state_dict())
    model.eval()
    with torch.no_grad():
        before = model(images, index)
        apply_lora(model)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)  # as if trained
        lora_out = model(images, index)
        merge_lora(model)
        merged_out = model(images, index)
    assert isinstance(model.backbone, SapiensViT)
    assert list(model.state_dict()) == plain_keys
    assert count_trainable(model) == sum(p.numel() for p in model.parameters())
    for dataset_id in lora_out:
        assert not torch.allclose(lora_out[dataset_id].heatmaps, before[dataset_id].heatmaps)
        torch.testing.assert_close(merged_out[dataset_id].heatmaps, lora_out[dataset_id].heatmaps,
                                   rtol=1e-4, atol=1e-7)


def test_lora_with_grad_checkpointing_trains_the_adapters(model):
    model.backbone.set_grad_checkpointing(True)
    apply_lora(model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    outputs = model(torch.randn(2, 3, *IMG), torch.tensor([0, 1]))
    sum(o.heatmaps.square().sum() for o in outputs.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)


@pytest.mark.parametrize("saved", [torch.tensor(5), torch.tensor(5.0, dtype=torch.float64), torch.tensor(5.0), 5])
def test_a_loaded_step_is_put_where_the_fused_update_needs_it(saved):
    """DeepSpeed's universal load sets each `step` as its files hold it (on the CPU, whatever the
    parameters' device, one tensor for all of ZeRO-3's partitions); the fused update needs a float32 step
    of its own beside each parameter."""
    from medsapiens.training.checkpoints import steps_beside_their_parameters

    def loaded(fused: bool):
        params = [torch.nn.Parameter(torch.ones(4)) for _ in range(2)]
        optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], fused=fused)
        for param in params:
            optimizer.state[param]["step"] = saved
        for group in optimizer.param_groups:  # as ZeRO-3 leaves them between its sub-group updates
            group["params"] = []
        steps_beside_their_parameters(optimizer)
        return params, [optimizer.state[param]["step"] for param in params]

    params, steps = loaded(fused=True)
    for param, step in zip(params, steps, strict=True):
        assert torch.is_tensor(step) and step.dtype == torch.float32 and step.device == param.device and step == 5
    assert steps[0] is not steps[1] and steps[0] is not saved
    assert all(step is saved for step in loaded(fused=False)[1])  # a plain AdamW keeps its steps as loaded
