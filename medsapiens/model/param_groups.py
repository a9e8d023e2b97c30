"""Optimiser parameter groups with layer-wise lr decay (Sapiens / MedSapiens recipe).

Layer ids: patch/pos embedding (Sapiens2: and its cls and storage tokens) 0, block i -> i + 1, final
norm and the whole decoder depth + 1;
a group's lr is base_lr * lr_scale with lr_scale = layer_decay ** (depth + 1 - layer_id): the
trainer's scheduler applies it. No weight decay on 1-D parameters (norms, biases), pos_embed and
the prefix tokens.
LoRA adapters train at the base lr whatever their block, as in MedSapiens (its layer-decay rule
matches backbone parameter names that adapter names never match).
"""
from __future__ import annotations

import re

from torch import nn

from medsapiens.model.lora import base_backbone, is_lora_parameter

BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
EMBEDDING = re.compile(r"(?:^|\.)(?:patch_embed|pos_embed|cls_token|storage_tokens)(?:\.|$)")
NO_DECAY_TOKENS = ("pos_embed", "cls_token", "storage_tokens")  # learned tokens and positions, as timm


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 0.85) -> list[dict]:
    """Groups for torch optimisers and `deepspeed.initialize` over the trainable parameters of a
    LandmarkModel (plain or LoRA-wrapped backbone). Each group has `params`, `weight_decay`,
    `lr_scale`, `name` (e.g. "backbone.layer3.decay") and `part` ("backbone", "lora" or "decoder",
    to log their lrs). Frozen parameters are left out and no group is empty."""
    depth = base_backbone(model).depth
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "lora" if is_lora_parameter(name) else "backbone" if name.startswith("backbone.") else "decoder"
        layer = layer_id(name, depth) if part == "backbone" else depth + 1
        decay = param.ndim > 1 and not name.endswith(NO_DECAY_TOKENS)
        group = groups.setdefault((part, layer, decay), {
            "name": f"{part}.layer{layer}.{'decay' if decay else 'no_decay'}",
            "part": part,
            "params": [],
            "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer),
        })
        group["params"].append(param)
    return list(groups.values())


def layer_id(backbone_param_name: str, depth: int) -> int:
    block = BLOCK.search(backbone_param_name)
    if block:
        return int(block.group(1)) + 1
    return 0 if EMBEDDING.search(backbone_param_name) else depth + 1
