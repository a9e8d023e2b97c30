"""Images per second of `medsapiens shards build` on the phantom sets, with 1 and 2 workers.

    python bench/shards_build.py [--n 40] [--max-side 1024] [--shard-size 8]

Phantom generation is timed apart and not counted in the build figures. Each build writes to a
fresh directory, so nothing is skipped as already complete.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from medsapiens.shards.build import BuildOptions, build
from medsapiens.shards.phantoms import SETS, write_phantoms
from medsapiens.shards.plan import SourceSpec


def timed_build(roots: dict, out: Path, workers: int, args) -> tuple[float, int]:
    specs = [SourceSpec(name, str(root)) for name, root in roots.items()]
    options = BuildOptions(out=str(out), max_side=args.max_side, shard_size=args.shard_size, workers=workers,
                           progress=False)
    start = time.perf_counter()
    result = build(specs, options)
    return time.perf_counter() - start, result.manifest.written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="phantom images per set")
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--shard-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shards-bench-") as tmp:
        start = time.perf_counter()
        roots = write_phantoms(Path(tmp, "raw"), n=args.n, seed=0)
        made = time.perf_counter() - start
        print(f"phantoms: {args.n * len(SETS)} images in {made:.2f} s = {args.n * len(SETS) / made:.1f} images/s (1 process)")
        rates = {}
        for workers in (1, 2):
            seconds, written = timed_build(roots, Path(tmp, f"out{workers}"), workers, args)
            rates[workers] = written / seconds
            print(f"build, {workers} worker(s): {written} images in {seconds:.2f} s")
        print(f"{'workers':>8} {'1':>10} {'2':>10} {'ratio 2/1':>10}")
        print(f"{'images/s':>8} {rates[1]:>10.1f} {rates[2]:>10.1f} {rates[2] / rates[1]:>10.2f}")


if __name__ == "__main__":
    main()
