"""`medsapiens model ...`: the core's own subcommands. No torch import until a command runs."""
from __future__ import annotations

import sys

GIB = 1024**3


def register(subparsers) -> None:
    parser = subparsers.add_parser("model", help="inspect backbones and convert Sapiens checkpoints")
    actions = parser.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    info = actions.add_parser("info", help="parameters, forward FLOPs and training memory of a configuration")
    _add_arch(info)
    info.add_argument("--img-size", nargs=2, type=int, metavar=("H", "W"),
                      help="input size, multiples of 16 (default: the Sapiens pose input, 1024 768)")
    info.add_argument("--trunk-width", type=int, help="decoder trunk channels (default: Sapiens' 768)")
    info.add_argument("--heads", type=int, metavar="N",
                      help="final-head channels in all (default: the sum of K over the built-in landmark sets)")
    info.set_defaults(func=_reporting_errors(run_info))

    convert = actions.add_parser("convert", help="write a Sapiens checkpoint's backbone as safetensors")
    convert.add_argument("checkpoint", help="*.pth (flat, backbone. or backbone.module. keys) or *.safetensors")
    _add_arch(convert)
    convert.add_argument("--out", required=True, help="the .safetensors file to write")
    convert.set_defaults(func=_reporting_errors(run_convert))


def _add_arch(parser) -> None:
    parser.add_argument("--arch", required=True, help="backbone size, e.g. sapiens_0.3b (an unknown name lists all)")


def _reporting_errors(command):
    """A bad argument or checkpoint is the user's to fix: one line on stderr, exit status 2."""

    def run(args) -> int:
        try:
            return command(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"medsapiens model {args.model_command}: error: {e}", file=sys.stderr)
            return 2

    return run


def run_info(args) -> int:
    from medsapiens import registry
    from medsapiens.model import DEFAULT_IMG_SIZE, DEFAULT_TRUNK_WIDTH, cost, feature_grid, get_arch

    arch = get_arch(args.arch)
    img_size = tuple(args.img_size or DEFAULT_IMG_SIZE)
    width = args.trunk_width or DEFAULT_TRUNK_WIDTH
    heads = args.heads if args.heads is not None else sum(s.num_landmarks for s in registry.BUILTIN.values())
    grid = feature_grid(img_size)
    params = cost.count_params(arch, img_size, width, heads)
    flops = cost.forward_flops(arch, img_size, width, heads)
    memory = {p: cost.memory_estimate(arch, img_size, width, heads, p) for p in ("fp32", "bf16")}

    print(f"{arch.name}: embed {arch.embed_dim}, depth {arch.depth}, heads {arch.num_heads}, MLP {arch.mlp_dim}")
    print(f"input {img_size[0]}x{img_size[1]}, tokens {grid[0]}x{grid[1]}, trunk width {width}, "
          f"head channels {heads}")
    print(f"parameters:   backbone {params.backbone:,}  decoder {params.decoder:,}  total {params.total:,}")
    print(f"forward GFLOP per image:  backbone {flops.backbone / 1e9:.2f}  decoder {flops.decoder / 1e9:.2f}  "
          f"total {flops.total / 1e9:.2f}  (a training step is ~3x)")
    print(f"training memory, GiB (AdamW, one device, no ZeRO)  {'fp32':>10} {'bf16 mixed':>12}")
    for label, field in (("weights", "weights"), ("gradients", "grads"), ("optimizer states", "optimizer"),
                         ("activations per image", "activations"),
                         ("activations per image, checkpointed", "activations_checkpointed")):
        values = [getattr(memory[p], field) / GIB for p in ("fp32", "bf16")]
        print(f"  {label:<48}{values[0]:>10.2f} {values[1]:>12.2f}")
    print("ZeRO-1 shards the optimizer states over the data-parallel ranks, ZeRO-2 also the gradients, "
          "ZeRO-3 also the weights; allow 10-20% for the framework.")
    return 0


def run_convert(args) -> int:
    from medsapiens.model import convert_checkpoint

    report = convert_checkpoint(args.checkpoint, args.arch, args.out)
    print(report.summary())
    print(f"wrote {args.out}")
    return 0
