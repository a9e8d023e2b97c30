"""Random Sapiens checkpoints in the released key format, for the model tests."""
import torch

RELEASED_GRID = 64


def released_state(arch, device="cpu", seed=0):
    """Random weights under the released `*_clean.pth` names and shapes (64x64 + cls pos_embed).
    Norm weights away from 1 and large pos_embed values, so every part of the forward matters."""
    gen = torch.Generator().manual_seed(seed)
    c, m = arch.embed_dim, arch.mlp_dim

    def rand(*shape, scale=0.05, offset=0.0):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=gen) * scale + offset

    state = {
        "cls_token": rand(1, 1, c),
        "pos_embed": rand(1, RELEASED_GRID**2 + 1, c, scale=0.5),
        "patch_embed.projection.weight": rand(c, 3, 16, 16, scale=0.02),
        "patch_embed.projection.bias": rand(c),
        "ln1.weight": rand(c, scale=0.2, offset=1.0),
        "ln1.bias": rand(c),
    }
    for i in range(arch.depth):
        p = f"layers.{i}."
        state.update({
            p + "ln1.weight": rand(c, scale=0.2, offset=1.0), p + "ln1.bias": rand(c),
            p + "attn.qkv.weight": rand(3 * c, c, scale=c**-0.5), p + "attn.qkv.bias": rand(3 * c),
            p + "attn.proj.weight": rand(c, c, scale=c**-0.5), p + "attn.proj.bias": rand(c),
            p + "ln2.weight": rand(c, scale=0.2, offset=1.0), p + "ln2.bias": rand(c),
            p + "ffn.layers.0.0.weight": rand(m, c, scale=c**-0.5), p + "ffn.layers.0.0.bias": rand(m),
            p + "ffn.layers.1.weight": rand(c, m, scale=m**-0.5), p + "ffn.layers.1.bias": rand(c),
        })
    return state
