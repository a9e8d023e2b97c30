"""The core's own commands: `medsapiens model {info,convert}` and `medsapiens export onnx`.
No torch import until a command runs."""
from __future__ import annotations

import argparse

from medsapiens.errors import InputError

GIB = 1024**3


def register(subparsers) -> None:
    parser = subparsers.add_parser("model", help="inspect backbones and convert Sapiens checkpoints")
    actions = parser.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    info = actions.add_parser("info", help="parameters, forward FLOPs and training memory of a configuration")
    _add_arch(info)
    info.add_argument("--img-size", nargs=2, type=int, metavar=("H", "W"),
                      help="input size, multiples of 16 (default: the Sapiens pose input, 1024 768)")
    info.add_argument("--trunk-width", type=positive_int, help="decoder trunk channels (default: Sapiens' 768)")
    info.add_argument("--heads", type=positive_int, metavar="N",
                      help="final-head channels in all (default: the sum of K over the built-in landmark sets)")
    info.set_defaults(func=run_info)

    convert = actions.add_parser(
        "convert", help="write a Sapiens checkpoint's backbone as safetensors, or a released MedSapiens "
        "checkpoint as a bundle")
    convert.add_argument("checkpoint", help="--from sapiens: *.pth (flat, backbone. or backbone.module. keys) or "
                         "*.safetensors; --from medsapiens: a released MedSapiens *.pth (mmengine, LoRA + head)")
    convert.add_argument("--from", dest="source", choices=("sapiens", "medsapiens"), default="sapiens",
                         help="sapiens (default): a Sapiens backbone -> .safetensors; medsapiens: a released "
                         "MedSapiens checkpoint -> a bundle (LoRA merged into --base, one head per dataset)")
    convert.add_argument("--arch", help="backbone size, e.g. sapiens_0.3b (an unknown name lists all); required "
                         "with --from sapiens, default sapiens_0.3b with --from medsapiens")
    convert.add_argument("--out", required=True,
                         help="--from sapiens: the .safetensors file to write; --from medsapiens: the bundle directory")
    release = convert.add_argument_group("--from medsapiens")
    release.add_argument("--base", help="the Sapiens checkpoint the MedSapiens LoRA was trained on, e.g. "
                         "sapiens_0.3b_epoch_1600_clean.pth")
    release.add_argument("--dataset", metavar="ID", help="a per-dataset (stage-2) checkpoint: its dataset "
                         "(head, chest, hand, leg); with the 88-channel multi-dataset model: keep only this head")
    convert.add_argument("--img-size", nargs=2, type=int, metavar=("H", "W"),
                         help="--from sapiens: the input size the checkpoint was trained at, where its position "
                         "table cannot tell (a non-square grid, e.g. a pose model's 1024 768; Sapiens2 has none); --from medsapiens: "
                         "the bundle's input size (default: MedSapiens' 1024 768); multiples of 16")
    convert.add_argument("--force", action="store_true", help="replace what --out already holds (the file, or the "
                         "bundle with its calibration)")
    convert.set_defaults(func=run_convert)

    ex = subparsers.add_parser("export", help="export a bundle for deployment (ONNX)")
    formats = ex.add_subparsers(dest="export_format", required=True, metavar="FORMAT")
    on = formats.add_parser(
        "onnx", help="the network and its DARK-UDP decoding as one ONNX graph",
        description="Export a bundle as ONNX (opset 18, dynamic batch): input `images` float32 (B, 3, H, W), "
        "preprocessed as medsapiens.data.preprocess does (described in the model's metadata), outputs "
        "<dataset>_landmarks (B, K, 2) in input pixels and <dataset>_scores (B, K), decoding and flip test "
        "inside. The metadata (key `medsapiens`) holds the landmark names, heads, input size, codec settings, "
        "flip test and calibration. Run it with `medsapiens predict --onnx MODEL.onnx`.")
    on.add_argument("bundle", help="bundle directory")
    on.add_argument("--out", required=True, metavar="MODEL.onnx",
                    help="the model file to write (with MODEL.onnx.data beside it for weights over 1.5 GiB)")
    on.add_argument("--force", action="store_true", help="replace an existing MODEL.onnx")
    on.add_argument("--dataset", help="export only this head (default: every head)")
    on.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=True,
                    help="average with the mirrored image inside the graph (default on; --no-flip-test)")
    on.set_defaults(func=_export_onnx)


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (a count or a size)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def count(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    if not text.strip().isdecimal():
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, got {text!r}")
    return int(text)


def _add_arch(parser) -> None:
    parser.add_argument("--arch", required=True, help="backbone size, e.g. sapiens_0.3b (an unknown name lists all)")


def run_info(args) -> int:
    from medsapiens.io import registry
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
          "ZeRO-3 also the weights.")
    print(f"largest micro-batch per GPU, bf16 mixed ({cost.FRAMEWORK_ALLOWANCE:.0%} kept for the framework)"
          f"{''.join(f'{card:>9}' for card in cost.GPU_MEMORY_GIB)}")
    for label, checkpointing, zero, ranks in (("one GPU", False, 2, 1), ("one GPU, checkpointed", True, 2, 1),
                                              ("8 GPUs, ZeRO-3, checkpointed", True, 3, 8)):
        sizes = [cost.largest_micro_batch(memory["bf16"], gib, checkpointing, zero, ranks)
                 for gib in cost.GPU_MEMORY_GIB.values()]
        print(f"  {label:<70}{''.join(f'{n:>9}' for n in sizes)}")
    return 0


def run_convert(args) -> int:
    if args.source == "medsapiens":
        return run_convert_release(args)
    given = [f"--{name}" for name in ("base", "dataset") if getattr(args, name) is not None]
    if given:
        raise InputError(f"{', '.join(given)}: only with --from medsapiens")
    if args.arch is None:
        raise InputError("--arch is required with --from sapiens (e.g. --arch sapiens_0.3b)")
    from medsapiens.model import convert_checkpoint

    report = convert_checkpoint(args.checkpoint, args.arch, args.out, tuple(args.img_size) if args.img_size else None,
                                args.force)
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


def run_convert_release(args) -> int:
    if args.base is None:
        raise InputError("--from medsapiens needs --base: the Sapiens checkpoint its LoRA was trained on "
                         "(sapiens_0.3b_epoch_1600_clean.pth for the released models)")
    from medsapiens.model import DEFAULT_IMG_SIZE
    from medsapiens.model.release import convert_release

    report = convert_release(args.checkpoint, args.base, args.out, arch=args.arch or "sapiens_0.3b",
                             img_size=tuple(args.img_size or DEFAULT_IMG_SIZE), dataset=args.dataset, force=args.force)
    print(report.summary())
    print(f"wrote bundle {args.out}")
    return 0


def _export_onnx(args) -> int:
    from medsapiens.deploy.export import export_onnx

    path = export_onnx(args.bundle, args.out, args.dataset, args.flip_test, args.force)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); run it with `medsapiens predict --onnx {path} IMAGES`")
    return 0
