"""Sapiens2 facts for tests, written from the published architecture alone (never from the model
code): the released key layout, random weights in it, and a float64 reference forward."""
import math

import torch


def released_layout(arch) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a released Sapiens2 backbone, from its published description."""
    c, heads, m, depth = arch.embed_dim, arch.num_heads, arch.mlp_dim, arch.depth
    hd = c // heads
    layout = {"patch_embed.projection.weight": (c, 3, 16, 16), "patch_embed.projection.bias": (c,),
              "cls_token": (1, 1, c), "storage_tokens": (1, 8, c), "rope_embed.periods": (hd // 4,), "ln1.weight": (c,)}
    for i in range(depth):
        kv = heads if i < 8 or i >= depth - 8 else heads // 2
        shapes = {"ln1.weight": (c,), "ln2.weight": (c,), "attn.wq.weight": (c, c), "attn.wq.bias": (c,),
                  "attn.wk.weight": (kv * hd, c), "attn.wk.bias": (kv * hd,), "attn.wv.weight": (kv * hd, c),
                  "attn.wv.bias": (kv * hd,), "attn.q_norm.weight": (hd,), "attn.k_norm.weight": (hd,),
                  "attn.proj.weight": (c, c), "attn.proj.bias": (c,), "attn.gamma.weight": (c,),
                  "ffn.w12.weight": (2 * m, c), "ffn.w12.bias": (2 * m,), "ffn.w3.weight": (c, m), "ffn.w3.bias": (c,)}
        layout.update({f"blocks.{i}.{k}": s for k, s in shapes.items()})
    return layout


def random_released_state(arch, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=generator) * (0.3 if len(s) == 1 else 0.05)
             for k, s in released_layout(arch).items()}
    hd = arch.embed_dim // arch.num_heads
    state["rope_embed.periods"] = 100.0 ** (2 * torch.arange(hd // 4, dtype=torch.bfloat16) / (hd // 2))
    return state


def rms(x, weight, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rope_tables(h, w, periods, dtype):
    """sin, cos of the patch grid, (h*w, head_dim), computed in `dtype` step by step."""
    ys = torch.arange(0.5, h, dtype=dtype) / h
    xs = torch.arange(0.5, w, dtype=dtype) / w
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([grid_y.reshape(-1), grid_x.reshape(-1)], dim=1)  # (h*w, 2): y then x
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / periods.to(dtype)  # (h*w, 2, head_dim/4)
    angles = angles.reshape(h * w, -1)
    angles = torch.cat([angles, angles], dim=1)
    return torch.sin(angles), torch.cos(angles)


def reference(state, arch, images, rope_dtype):
    """The backbone's patch features (B, C, h, w) in float64; RoPE tables and rotation in `rope_dtype`."""
    p = {k: v.double() for k, v in state.items()}
    c, heads, depth = arch.embed_dim, arch.num_heads, arch.depth
    hd = c // heads
    x = torch.nn.functional.conv2d(images.double(), p["patch_embed.projection.weight"],
                                   p["patch_embed.projection.bias"], stride=16)
    b, _, h, w = x.shape
    x = torch.cat([p["cls_token"].expand(b, 1, c), p["storage_tokens"].expand(b, 8, c),
                   x.reshape(b, c, h * w).permute(0, 2, 1)], dim=1)
    n = x.shape[1]
    sin, cos = rope_tables(h, w, state["rope_embed.periods"], rope_dtype)

    def rope(t):  # t (b, heads, n, hd): every token through rope_dtype, the 9 prefix tokens not rotated
        t = t.to(rope_dtype)
        half = hd // 2
        patches = t[:, :, 9:]
        turned = torch.cat([-patches[..., half:], patches[..., :half]], dim=-1)
        return torch.cat([t[:, :, :9], patches * cos + turned * sin], dim=2).double()

    for i in range(depth):
        blk = {k[len(f"blocks.{i}."):]: v for k, v in p.items() if k.startswith(f"blocks.{i}.")}
        kv = heads if i < 8 or i >= depth - 8 else heads // 2
        y = rms(x, blk["ln1.weight"])
        q = (y @ blk["attn.wq.weight"].T + blk["attn.wq.bias"]).reshape(b, n, heads, hd).permute(0, 2, 1, 3)
        k = (y @ blk["attn.wk.weight"].T + blk["attn.wk.bias"]).reshape(b, n, kv, hd).permute(0, 2, 1, 3)
        v = (y @ blk["attn.wv.weight"].T + blk["attn.wv.bias"]).reshape(b, n, kv, hd).permute(0, 2, 1, 3)
        q, k = rope(rms(q, blk["attn.q_norm.weight"])), rope(rms(k, blk["attn.k_norm.weight"]))
        k, v = k.repeat_interleave(heads // kv, dim=1), v.repeat_interleave(heads // kv, dim=1)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        merged = attention.permute(0, 2, 1, 3).reshape(b, n, c)
        x = x + (merged @ blk["attn.proj.weight"].T + blk["attn.proj.bias"]) * blk["attn.gamma.weight"]
        y = rms(x, blk["ln2.weight"])
        hidden = y @ blk["ffn.w12.weight"].T + blk["ffn.w12.bias"]
        gate, value = hidden[..., :arch.mlp_dim], hidden[..., arch.mlp_dim:]
        x = x + (gate * torch.sigmoid(gate) * value) @ blk["ffn.w3.weight"].T + blk["ffn.w3.bias"]
    x = rms(x, p["ln1.weight"])
    return x[:, 9:].permute(0, 2, 1).reshape(b, c, h, w)
