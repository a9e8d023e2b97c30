"""The Sapiens2 ViT (Meta, 2026), written from its published architecture; its state-dict keys are the
released ones (`sapiens2_*_pretrain.safetensors`), so released weights load without renaming.

(B, 3, H, W) -> patch features (B, C, H/16, W/16), like SapiensViT. What differs from Sapiens:
- patch conv 16x16, stride 16, no padding (`patch_embed.projection`); no learned position table:
  one cls token and STORAGE_TOKENS storage tokens go before the patches, and 2-D RoPE rotates the
  patch tokens' queries and keys (the prefix tokens are not rotated);
- RMSNorm (eps 1e-6) before attention (`ln1`), before the FFN (`ln2`) and at the end (`ln1` of the
  model); RMSNorm per head on queries and keys before RoPE (`q_norm`, `k_norm`);
- grouped-query attention with heads/2 key-value heads, except the first and last
  SAPIENS2_FULL_ATTENTION_BLOCKS (8) blocks, which keep one per head (archs.kv_heads);
- LayerScale on the attention branch only (`attn.gamma`); a SwiGLU FFN (`ffn.w12` = both input
  projections, `ffn.w3` the output).

RoPE: per axis, coordinates (i + 0.5) / n * 2 - 1 in [-1, 1]; head_dim/4 periods
ROPE_BASE ** (2j / (head_dim/2)); angles 2 pi coord / period for y then x, repeated twice along the
head dimension; x * cos + rotate_half(x) * sin. The released models compute the table and the rotation
in bfloat16 (`rope_dtype`), whatever the model's own precision, and so does this one by default.
The 4K windowed tokenizer of Sapiens2-1B-4K is not implemented.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medsapiens.model.archs import (
    DEFAULT_IMG_SIZE,
    PATCH_SIZE,
    SAPIENS2_PREFIX_TOKENS,
    ArchSpec,
    feature_grid,
    kv_heads,
)

STORAGE_TOKENS = SAPIENS2_PREFIX_TOKENS - 1  # after the cls token
ROPE_BASE = 100.0
LAYER_SCALE_INIT = 1e-4
NORM_EPS = 1e-6


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp32 result rounded to `dtype` (and held in fp32): what an operation in `dtype` returns."""
    return t.to(dtype).float()


class RopeTables(NamedTuple):
    """The (sin, cos) tables of a token grid, (h*w, head_dim) each, with the dtype they are exact in."""

    sin: torch.Tensor
    cos: torch.Tensor
    dtype: torch.dtype

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """RoPE on the last h*w tokens of x (B, heads, N, head_dim). All of x is rounded to the tables'
        dtype, the prefix tokens too, as in the released models."""
        x_in = rounded(x, self.dtype)
        prefix = x.shape[-2] - self.sin.shape[-2]
        patches = x_in[..., prefix:, :]
        first, second = patches.chunk(2, dim=-1)
        turned = rounded(patches * self.cos, self.dtype) + rounded(torch.cat([-second, first], dim=-1) * self.sin,
                                                                   self.dtype)
        return torch.cat([x_in[..., :prefix, :], rounded(turned, self.dtype)], dim=-2).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE tables as the released models compute them in `dtype`. Every step is an fp32 operation
    whose result is rounded to `dtype`: exactly what an operation in bfloat16 does, and the ONNX graph
    of it needs no bfloat16 kernel (only casts)."""

    def __init__(self, head_dim: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.table_dtype = dtype
        exponents = 2 * torch.arange(head_dim // 4, dtype=dtype) / (head_dim // 2)
        self.register_buffer("periods", ROPE_BASE**exponents, persistent=True)

    def forward(self, h: int, w: int) -> RopeTables:
        dtype, device = self.table_dtype, self.periods.device

        def r(t):
            return rounded(t, dtype)

        ys = r(torch.arange(0.5, h, device=device) / h)
        xs = r(torch.arange(0.5, w, device=device) / w)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # (h*w, 2)
        coords = r(r(2.0 * coords) - 1.0)
        angles = r(r(2 * math.pi * coords[:, :, None]) / r(self.periods.float()))
        angles = angles.flatten(1, 2).tile(2)  # (h*w, head_dim): y angles, x angles, twice
        return RopeTables(r(torch.sin(angles)), r(torch.cos(angles)), dtype)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class GroupedQueryAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv: int):
        super().__init__()
        self.heads, self.kv, self.head_dim = heads, kv, dim // heads
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, kv * self.head_dim)
        self.wv = nn.Linear(dim, kv * self.head_dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=NORM_EPS)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=NORM_EPS)
        self.proj = nn.Linear(dim, dim)
        self.gamma = LayerScale(dim)

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        b, n, dim = x.shape
        q = self.q_norm(self.wq(x).view(b, n, self.heads, self.head_dim).transpose(1, 2))
        k = self.k_norm(self.wk(x).view(b, n, self.kv, self.head_dim).transpose(1, 2))
        v = self.wv(x).view(b, n, self.kv, self.head_dim).transpose(1, 2)
        q, k = rope.rotate(q), rope.rotate(k)
        grouped = self.kv != self.heads
        if grouped and q.dtype not in (torch.bfloat16, torch.float16):
            # the fused GQA kernels are half-precision only; fp32 (and the ONNX export) repeats K and V
            k, v = (t.repeat_interleave(self.heads // self.kv, dim=1) for t in (k, v))
            grouped = False
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=grouped)
        return self.gamma(self.proj(out.transpose(1, 2).reshape(b, n, dim)))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv: int, hidden: int):
        super().__init__()
        self.ln1 = nn.RMSNorm(dim, eps=NORM_EPS)
        self.attn = GroupedQueryAttention(dim, heads, kv)
        self.ln2 = nn.RMSNorm(dim, eps=NORM_EPS)
        self.ffn = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), rope)
        return x + self.ffn(self.ln2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.projection = nn.Conv2d(3, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(images).flatten(2).transpose(1, 2)


class Sapiens2ViT(nn.Module):
    """Sapiens2 backbone at a fixed input size (the decoder's grid); RoPE itself fits any size."""

    def __init__(self, arch: ArchSpec, img_size: tuple[int, int] = DEFAULT_IMG_SIZE,
                 rope_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.arch, self.depth, self.embed_dim = arch, arch.depth, arch.embed_dim
        self._grid = feature_grid(img_size)
        dim = arch.embed_dim
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, STORAGE_TOKENS, dim))
        self.rope_embed = RotaryEmbedding(dim // arch.num_heads, rope_dtype)
        self.blocks = nn.ModuleList(Block(dim, arch.num_heads, kv_heads(arch, i), arch.mlp_dim)
                                    for i in range(arch.depth))
        self.ln1 = nn.RMSNorm(dim, eps=NORM_EPS)
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.storage_tokens, std=0.02)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self._grid

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, height, width = images.shape
        h, w = height // PATCH_SIZE, width // PATCH_SIZE
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.storage_tokens.expand(b, -1, -1),
                       self.patch_embed(images)], dim=1)
        rope = self.rope_embed(h, w)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        patches = self.ln1(x)[:, SAPIENS2_PREFIX_TOKENS:]
        return patches.transpose(1, 2).reshape(b, self.embed_dim, h, w)
