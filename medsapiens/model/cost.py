"""Analytic parameter counts, forward FLOPs and training-memory estimates. Torch-free.

FLOPs: 2 per multiply-add, counting the matmuls, attention (QK^T and AV), the patch conv and the
decoder's (de)convolutions: the convention of torch.utils.flop_counter and of MFU figures. Norms,
activations, softmax and bias adds are left out (well under 1%). A training step costs about
3 x forward (backward = 2 x forward: gradients of the activations and of the weights); a frozen
backbone (LoRA) needs only its activations' gradients, 2 x its forward (the adapters' matmuls are
well under 1%), except in attention's two products, whose operands both need gradients: 3 x. The
patch conv computes no gradient of its input, the image: 2 x its forward, 1 x when frozen.
Activation checkpointing recomputes most of a backbone forward, which MFU conventionally does not
count.

`head_channels` is the number of final-head channels an image goes through: its dataset's K (or
the sum over heads, an upper bound; the heads cost well under 1% either way).

Sapiens2 blocks differ in what they count: the key and value projections of grouped-query blocks
are half as wide, the SwiGLU FFN has three C x M matmuls instead of two, the nine prefix tokens go
through every block, and RoPE's rotation (x cos + rotate(x) sin: 3 FLOPs an element of the patch
tokens' queries and keys) is counted, though well under 1%.
"""
from __future__ import annotations

from dataclasses import dataclass

from medsapiens.model.archs import (
    DEFAULT_IMG_SIZE,
    DEFAULT_TRUNK_WIDTH,
    PATCH_SIZE,
    ArchSpec,
    feature_grid,
    get_arch,
    kv_heads,
    prefix_tokens,
)

DECONV_TAPS = 16  # 4x4 kernels
UPSAMPLING = 4  # two stride-2 deconvs: heatmaps are (H/4, W/4), 16x the token grid's area

# Bytes per parameter and per activation element. "bf16" is DeepSpeed-style mixed precision: bf16
# weights and grads; in the optimizer fp32 master weights, Adam m and v, and the fp32 copy of the
# gradients that the step reads (2 + 2 + 16 bytes; on one H200 this static part plus the activations
# below came within 2% of the measured peaks of sapiens_0.3b with ZeRO-2 and sapiens_2b with ZeRO-3).
# DeepSpeed's ZeRO optimizer holds the same four in fp32 too: its master partition is a copy of the
# weights, not the weights themselves (4 + 4 + 16; without ZeRO it steps the weights: 8 of the 16).
PRECISIONS = {
    "fp32": {"weights": 4, "grads": 4, "optimizer": 16, "activation": 4},
    "bf16": {"weights": 2, "grads": 2, "optimizer": 16, "activation": 2},
}
# Usable memory of common training GPUs (what the driver reports), GiB.
GPU_MEMORY_GIB = {"40 GB": 40.0, "80 GB": 79.6, "141 GB": 140.4}
FRAMEWORK_ALLOWANCE = 0.1  # CUDA context, allocator fragmentation, workspaces, communication buckets


@dataclass(frozen=True)
class Split:
    backbone: int
    decoder: int
    # of `backbone`'s FLOPs: attention's QK^T and AV, products of two activations; the patch conv, on the image
    attention: int = 0
    patch: int = 0

    @property
    def total(self) -> int:
        return self.backbone + self.decoder


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes. Activations are per image: what autograd keeps from forward to backward."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    activations_checkpointed: int

    def total(self, micro_batch: int = 1, checkpointing: bool = False) -> int:
        per_image = self.activations_checkpointed if checkpointing else self.activations
        return self.weights + self.grads + self.optimizer + micro_batch * per_image


def largest_micro_batch(memory: MemoryEstimate, device_gib: float, checkpointing: bool = False, zero: int = 2,
                        ranks: int = 1) -> int:
    """The largest micro-batch whose estimate fits `device_gib` less the framework allowance, with ZeRO
    stage `zero` sharding over `ranks` GPUs; 0 when the weights and optimizer states alone do not fit."""
    static = (memory.weights / (ranks if zero >= 3 else 1) + memory.grads / (ranks if zero >= 2 else 1)
              + memory.optimizer / (ranks if zero >= 1 else 1))
    per_image = memory.activations_checkpointed if checkpointing else memory.activations
    return max(0, int((device_gib * 2**30 * (1 - FRAMEWORK_ALLOWANCE) - static) // per_image))


def count_params(arch: str | ArchSpec, img_size=DEFAULT_IMG_SIZE, trunk_width: int = DEFAULT_TRUNK_WIDTH,
                 head_channels: int = 0) -> Split:
    a, tokens = get_arch(arch), _tokens(img_size)
    c, w = a.embed_dim, trunk_width
    patch = c * 3 * PATCH_SIZE**2 + c
    blocks = sum(_block_params(a, i) for i in range(a.depth))
    if a.family == "sapiens2":  # cls and storage tokens, RMSNorm without bias
        backbone = patch + prefix_tokens(a) * c + blocks + c
    else:  # learned positions, LayerNorm with bias
        backbone = patch + tokens * c + blocks + 2 * c
    decoder = DECONV_TAPS * (c * w + w * w) + 2 * (w * w + w) + head_channels * (w + 1)
    return Split(backbone, decoder)


def _block_params(a: ArchSpec, block: int) -> int:
    c, m, kv = a.embed_dim, a.mlp_dim, kv_heads(a, block) * a.embed_dim // a.num_heads
    if a.family == "sapiens2":
        # ln1, ln2 C each; wq C^2 + C; wk, wv kv C + kv each; q_norm, k_norm one head each; proj C^2 + C;
        # LayerScale C; w12 2CM + 2M; w3 MC + C
        return 2 * c * c + 2 * kv * c + 3 * c * m + 6 * c + 2 * kv + 2 * c // a.num_heads + 2 * m
    # norm1 2C, qkv 3C^2 + 3C, proj C^2 + C, norm2 2C, fc1 CM + M, fc2 MC + C
    return 4 * c * c + 2 * c * m + 9 * c + m


def forward_flops(arch: str | ArchSpec, img_size=DEFAULT_IMG_SIZE, trunk_width: int = DEFAULT_TRUNK_WIDTH,
                  head_channels: int = 0) -> Split:
    """Forward FLOPs for one image (see the module docstring for what counts)."""
    a, tokens = get_arch(arch), _tokens(img_size)
    c, w = a.embed_dim, trunk_width
    patch = 2 * tokens * c * 3 * PATCH_SIZE**2
    blocks = sum(_block_flops(a, i, tokens) for i in range(a.depth))
    attention = a.depth * _attention_flops(a, tokens)
    # a transposed conv multiplies every input pixel by the whole kernel
    deconvs = 2 * DECONV_TAPS * (tokens * c * w + UPSAMPLING * tokens * w * w)
    heatmap_pixels = UPSAMPLING**2 * tokens
    convs = 2 * heatmap_pixels * (2 * w * w + w * head_channels)
    return Split(patch + blocks, deconvs + convs, attention, patch)


def training_flops(forward: Split, frozen_backbone: bool = False) -> int:
    """FLOPs of one image's training step, forward and backward (see the module docstring)."""
    weighted = forward.backbone - forward.attention - forward.patch  # the matmuls with weights
    if frozen_backbone:
        return 2 * weighted + 3 * forward.attention + forward.patch + 3 * forward.decoder
    return 3 * forward.total - forward.patch


def _block_flops(a: ArchSpec, block: int, patches: int) -> int:
    c, m = a.embed_dim, a.mlp_dim
    n = patches + prefix_tokens(a)
    attention = _attention_flops(a, patches)
    if a.family == "sapiens2":
        kv = kv_heads(a, block) * c // a.num_heads
        matmuls = 2 * n * (2 * c * c + 2 * c * kv + 3 * c * m)
        return matmuls + attention + 3 * patches * (c + kv)
    return 2 * n * (4 * c * c + 2 * c * m) + attention


def _attention_flops(a: ArchSpec, patches: int) -> int:
    """QK^T and AV of one block, over all heads (grouped heads share K and V, not the work)."""
    n = patches + prefix_tokens(a)
    return 4 * n * n * a.embed_dim


def memory_estimate(arch: str | ArchSpec, img_size=DEFAULT_IMG_SIZE, trunk_width: int = DEFAULT_TRUNK_WIDTH,
                    head_channels: int = 0, precision: str = "bf16") -> MemoryEstimate:
    """Training memory with AdamW under DeepSpeed's ZeRO optimizer, all parameters trainable, on one
    device (ZeRO-1 divides `optimizer` by the data-parallel size, ZeRO-2 also `grads`, ZeRO-3 also
    `weights`).

    Activations assume a fused SDPA kernel (flash or memory-efficient: no N x N attention matrix
    kept) and, with checkpointing, timm's per-block checkpoints: every block keeps its input and one
    block at a time is recomputed in full. Left out: CUDA context, allocator fragmentation,
    framework workspaces and communication buckets (budget 10-20% more)."""
    sizes = PRECISIONS[precision]
    params = count_params(arch, img_size, trunk_width, head_channels).total
    full, checkpointed = _activation_elements(get_arch(arch), img_size, trunk_width, head_channels)
    return MemoryEstimate(
        weights=params * sizes["weights"],
        grads=params * sizes["grads"],
        optimizer=params * sizes["optimizer"],
        activations=full * sizes["activation"],
        activations_checkpointed=checkpointed * sizes["activation"],
    )


def _activation_elements(a: ArchSpec, img_size, trunk_width: int, head_channels: int) -> tuple[int, int]:
    """Saved-for-backward elements per image: (without, with activation checkpointing)."""
    tokens, c, w = _tokens(img_size), a.embed_dim, trunk_width
    n = tokens + prefix_tokens(a)
    blocks = [n * _block_elements_per_token(a, i) for i in range(a.depth)]
    image = 3 * img_size[0] * img_size[1]  # the patch conv keeps its input for the weight grad
    final_norm = n * (c + 2)
    heatmap_pixels = UPSAMPLING**2 * tokens
    # the features in NCHW; per trunk layer its conv, norm and SiLU outputs; the loss's weighted error
    trunk_pixels = UPSAMPLING * tokens + 3 * heatmap_pixels
    decoder = tokens * c + 3 * w * trunk_pixels + head_channels * heatmap_pixels
    rope_tables = 2 * tokens * c // a.num_heads if a.family == "sapiens2" else 0  # sin and cos, shared by the blocks
    common = image + final_norm + decoder + rope_tables
    return common + sum(blocks), common + a.depth * n * c + max(blocks)


def _block_elements_per_token(a: ArchSpec, block: int) -> int:
    c, m, heads = a.embed_dim, a.mlp_dim, a.num_heads
    if a.family == "sapiens2":
        kv_count = kv_heads(a, block)
        kv = kv_count * c // heads
        # RMSNorm keeps its input, x * rstd and its output: ln1 and ln2 3C each; q 2C and k 2kv around
        # their norms, and the rotated q, k with v for attention (C + 2kv); the attention output, its
        # merged copy, proj's output (LayerScale's input) 3C; w12's output, SiLU's and the product 4M;
        # the rstds (ln1, ln2, each q and k head) and the logsumexp (one per head)
        return 12 * c + 4 * kv + 4 * m + 2 + 2 * heads + kv_count
    # norm1 input and output, q k v, the attention output (which is also proj's input), norm2 input
    # and output (8C); fc1 output and GELU output (2M); two LayerNorms' mean and rstd (4); the
    # attention's logsumexp (one per head)
    return 8 * c + 2 * m + 4 + heads


def _tokens(img_size) -> int:
    h, w = feature_grid(img_size)
    return h * w
