"""LoRA on the backbone's attention (MedSapiens recipe) via peft; only LoRA and the decoder train.

`apply_lora` wraps `model.backbone` in a peft model, so backbone parameter names gain the prefix
`backbone.base_model.model.`; `merge_lora` folds the adapters back into a plain backbone."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from medsapiens.errors import InputError
from medsapiens.model.backbone import Backbone

# peft matches a list entry as a name suffix after a dot: "blocks.3.attn.proj" matches, the patch
# embedding's "patch_embed.proj" does not. The qkv rank goes to Sapiens' fused qkv, or to Sapiens2's
# separate query, key and value projections.
QKV, PROJ = "attn.qkv", "attn.proj"
QKV_TARGETS = {"sapiens": (QKV,), "sapiens2": ("attn.wq", "attn.wk", "attn.wv")}
LORA_PARAM = ".lora_"  # in every adapter parameter's name (peft's lora_A / lora_B)
# For a stage config's APPLIES_WHEN: with LoRA the adapters and the decoder train at the base lr (param_groups),
# the rest of the backbone is frozen, so layer_decay scales nothing.
LAYER_DECAY_APPLIES_WHEN = {"optim.layer_decay": ("lora.enabled", False)}


@dataclass
class LoraConfig:
    """The `lora` config section; the defaults are MedSapiens' adapters."""

    APPLIES_WHEN: ClassVar = {key: ("enabled", True) for key in ("qkv_rank", "qkv_alpha", "proj_rank", "proj_alpha", "dropout")}

    enabled: bool = False
    qkv_rank: int = 4
    qkv_alpha: float = 4.0
    proj_rank: int = 8
    proj_alpha: float = 8.0
    dropout: float = 0.1

    def check(self) -> None:
        for key in ("qkv_rank", "proj_rank"):
            if getattr(self, key) < 1:
                raise InputError(f"lora.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("qkv_alpha", "proj_alpha"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise InputError(f"lora.{key} must be a positive number, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"lora.dropout must be in [0, 1), got {self.dropout}")


def is_lora_parameter(name: str) -> bool:
    return LORA_PARAM in name


def apply_lora(model: nn.Module, cfg: LoraConfig | None = None) -> nn.Module:
    """Wrap `model.backbone` in place: LoRA on every block's attention input projections (attn.qkv;
    Sapiens2: attn.wq, wk, wv) and attn.proj, up-projection
    zero-initialised (the model's output is unchanged at first), every other backbone weight
    frozen. Returns `model`."""
    cfg = cfg or LoraConfig()
    from peft import LoraConfig as PeftLoraConfig  # ~1 s to import: only LoRA runs pay it
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=cfg.qkv_rank,
        lora_alpha=cfg.qkv_alpha,
        lora_dropout=cfg.dropout,
        target_modules=[*QKV_TARGETS[model.backbone.arch.family], PROJ],
        rank_pattern={PROJ.replace(".", r"\."): cfg.proj_rank},
        alpha_pattern={PROJ.replace(".", r"\."): cfg.proj_alpha},
        init_lora_weights=True,
    )
    training = model.backbone.training
    model.backbone = get_peft_model(model.backbone, config)
    model.backbone.train(training)  # the new dropout layers start in train mode
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights: `model.backbone` becomes a plain, fully trainable
    backbone with the same keys as one that never had LoRA. Returns `model`."""
    model.backbone = model.backbone.merge_and_unload()
    model.backbone.requires_grad_(True)
    return model


def base_backbone(model: nn.Module) -> Backbone:
    """`model.backbone` itself, or the backbone inside its peft wrapper."""
    backbone = model.backbone
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
