"""Images per second of `medsapiens predict`: the PyTorch bundle against its ONNX export on onnxruntime.

    python bench/predict_onnx.py [--bundle B] [--n 32] [--batch-size 8]

Both runs predict the same phantom head images (written once, 480 x 600 BMPs) through the same
`medsapiens.evaluate.predict.predict` (decoding, flip test, writing the JSON files), in this one process, after
one warm-up run each; only the model backend differs. Without --bundle a seeded random model of the
demo's size (sapiens_tiny, 128 x 96) is exported: speed does not depend on the weights.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from medsapiens.deploy.export import export_onnx
from medsapiens.evaluate.predict import PredictOptions, predict
from medsapiens.io import registry
from medsapiens.model import ModelConfig
from medsapiens.model import bundle as bundlelib
from medsapiens.shards.phantoms import write_phantoms


def random_bundle(out: Path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="sapiens_tiny", img_size=(128, 96), trunk_width=64)
    sets = {"head": registry.get("head")}
    return bundlelib.save(out, cfg.build({"head": 19}), bundlelib.Bundle(cfg, sets))


def images_per_s(images: Path, out: Path, n: int, options: PredictOptions, **backend) -> float:
    predict([str(images)], out / "warm-up", options, **backend)
    start = time.perf_counter()
    results, _ = predict([str(images)], out / "timed", options, **backend)
    assert len(results) == n
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle directory (default: a random demo-sized model)")
    parser.add_argument("--n", type=int, default=32, help="images")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp:
        tmp = Path(tmp)
        bundle = Path(args.bundle) if args.bundle else random_bundle(tmp / "bundle")
        model = export_onnx(bundle, tmp / "model.onnx", dataset="head")
        write_phantoms(tmp / "raw", n=args.n, seed=0, sets=("head",))
        images = tmp / "images"
        images.mkdir()
        for i, path in enumerate(sorted((tmp / "raw" / "head" / "RawImage").rglob("*.bmp"))[:args.n]):
            (images / f"{i:03d}.bmp").write_bytes(path.read_bytes())
        n = len(list(images.iterdir()))
        options = PredictOptions(dataset="head", batch_size=args.batch_size)
        on_torch = images_per_s(images, tmp / "torch", n, options, bundle_dir=bundle)
        on_onnx = images_per_s(images, tmp / "onnx", n, options, onnx=model)
        print(f"predict, {n} images, batch {args.batch_size}, flip test, torch threads {torch.get_num_threads()}: "
              f"PyTorch bundle {on_torch:.1f} images/s, onnxruntime {on_onnx:.1f} images/s, "
              f"ratio onnxruntime / PyTorch {on_onnx / on_torch:.2f}")


if __name__ == "__main__":
    main()
