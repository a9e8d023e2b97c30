"""LoRA on the backbone's attention (MedSapiens recipe) via peft; only LoRA and the decoder train.

`apply_lora` wraps `model.backbone` in a peft model, so backbone parameter names gain the prefix
`backbone.base_model.model.`; `merge_lora` folds the adapters back into a plain backbone."""
from __future__ import annotations

from torch import nn

from medsapiens.model.backbone import SapiensViT

# peft matches a list entry as a name suffix after a dot: "blocks.3.attn.proj" matches, the patch
# embedding's "patch_embed.proj" does not.
QKV, PROJ = "attn.qkv", "attn.proj"


def apply_lora(model: nn.Module, qkv_rank: int = 4, qkv_alpha: float = 4, proj_rank: int = 8,
               proj_alpha: float = 8, dropout: float = 0.1) -> nn.Module:
    """Wrap `model.backbone` in place: LoRA on every block's attn.qkv and attn.proj, up-projection
    zero-initialised (the model's output is unchanged at first), every other backbone weight
    frozen. Returns `model`."""
    from peft import LoraConfig, get_peft_model  # ~1 s to import: only LoRA runs pay it

    config = LoraConfig(
        r=qkv_rank,
        lora_alpha=qkv_alpha,
        lora_dropout=dropout,
        target_modules=[QKV, PROJ],
        rank_pattern={PROJ.replace(".", r"\."): proj_rank},
        alpha_pattern={PROJ.replace(".", r"\."): proj_alpha},
        init_lora_weights=True,
    )
    training = model.backbone.training
    model.backbone = get_peft_model(model.backbone, config)
    model.backbone.train(training)  # the new dropout layers start in train mode
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights: `model.backbone` becomes a plain, fully trainable
    SapiensViT with the same keys as one that never had LoRA. Returns `model`."""
    model.backbone = model.backbone.merge_and_unload()
    model.backbone.requires_grad_(True)
    return model


def base_backbone(model: nn.Module) -> SapiensViT:
    """`model.backbone` itself, or the SapiensViT inside its peft wrapper."""
    backbone = model.backbone
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
