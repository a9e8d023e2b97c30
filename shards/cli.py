"""`medsapiens shards {phantoms,build,inspect,verify}`.

Registration imports nothing heavy (no numpy, PIL or torch): `--help` stays fast. Each handler
imports what it needs; the exit status follows medsapiens.errors (1: the data failed a check,
`CheckFailed`; 2: the command could not run as given).
"""
from __future__ import annotations

from pathlib import Path

from medsapiens.errors import CheckFailed, InputError
from medsapiens.shards import (
    DEFAULT_MAX_SIDE,
    DEFAULT_MULTIPART_MB,
    DEFAULT_SHARD_SIZE,
    DEFAULT_WORKERS,
    OUTSIDE_CHOICES,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("shards", help="raw datasets or phantoms -> validated WebDataset shards")
    actions = parser.add_subparsers(dest="shards_command", required=True, metavar="ACTION")

    phantoms = actions.add_parser("phantoms", help="write synthetic datasets in the real datasets' native layouts")
    phantoms.add_argument("--out", required=True, help="directory; each set goes to OUT/<set>")
    phantoms.add_argument("--n", type=int, default=60, help="images per set (default 60)")
    phantoms.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    phantoms.add_argument("--sets", default="head,hand,chest,leg", help="comma-separated (default all four)")
    phantoms.set_defaults(func=run_phantoms)

    build = actions.add_parser(
        "build", help="read datasets in their native layouts and write shards + manifest.json",
        description="Sources: ID=PATH reads a registry dataset (head, hand, chest, leg, aariz) with its native "
        "reader; ID:READER=PATH picks a reader (isbi2015, hand, chest, leg, coco, aariz, dicom), e.g. "
        "spine:coco=ann.json. Reader options: --opt ID.KEY=VALUE, e.g. --opt head.gt=senior. Every source also "
        "takes val_fraction (default 0.1) and val_seed (0): where it has no val split, a seeded one is carved "
        "from train, never from a test split (docs/splits.md).",
    )
    build.add_argument("--source", action="append", default=[], metavar="ID[:READER]=PATH", help="repeatable")
    build.add_argument("--out", required=True, help="directory or s3://bucket/prefix")
    build.add_argument("--opt", action="append", default=[], metavar="ID.KEY=VALUE", help="reader option, repeatable")
    build.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="longest side of stored images: larger ones are scaled down, none up (default %(default)s)")
    build.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="inputs per shard; its rejected ones leave it smaller (default %(default)s)")
    build.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="writer processes (default min(4, CPUs) = %(default)s)")
    build.add_argument("--outside", choices=OUTSIDE_CHOICES, default="reject",
                       help="a landmark outside its image rejects the sample (default) or is marked invisible")
    build.add_argument("--strict", action="store_true", help="exit 1 if any input is rejected (after the report)")
    build.add_argument("--overwrite", action="store_true", help="replace shards an earlier build with other options left (an interrupted one resumes)")
    build.add_argument("--multipart-mb", type=int, default=DEFAULT_MULTIPART_MB,
                       help="S3 uploads above this many MiB go in parts (default %(default)s, at least 5)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar (written into a file, it updates every 30 s)")
    build.set_defaults(func=run_build)

    inspect = actions.add_parser("inspect", help="counts, sizes, spacing per dataset; a contact sheet")
    inspect.add_argument("location", help="shard directory, s3://bucket/prefix or a manifest.json")
    inspect.add_argument("--sheet", help="write a contact-sheet PNG here")
    inspect.add_argument("--n", type=int, default=16, help="samples on the contact sheet (default 16)")
    inspect.set_defaults(func=run_inspect)

    verify = actions.add_parser("verify", help="re-read every shard; check counts, bytes, sha256 and records")
    verify.add_argument("location", help="shard directory, s3://bucket/prefix or a manifest.json")
    verify.set_defaults(func=run_verify)


def run_phantoms(args) -> int:
    from medsapiens.shards.phantoms import write_phantoms

    roots = write_phantoms(args.out, n=args.n, seed=args.seed, sets=[s for s in args.sets.split(",") if s])
    for name, root in roots.items():
        print(f"{name}: {args.n} phantom images in {root}")
    print("build shards with: medsapiens shards build " + " ".join(f"--source {n}={r}" for n, r in roots.items())
          + " --out SHARDS")
    return 0


def run_build(args) -> int:
    from medsapiens.shards.build import BuildOptions, build, summary_lines
    from medsapiens.shards.plan import SourceSpec, attach_options

    specs = attach_options([SourceSpec.parse(text) for text in args.source], args.opt)
    options = BuildOptions(
        out=args.out, max_side=args.max_side, shard_size=args.shard_size, outside=args.outside,
        workers=args.workers, overwrite=args.overwrite, multipart_mb=args.multipart_mb,
        progress=not args.no_progress,
    )
    result = build(specs, options)
    print("\n".join(summary_lines(result)))
    if args.strict and result.rejected:
        raise CheckFailed(f"--strict: {len(result.rejected)} input(s) rejected; see the report above")
    return 0


def load_manifest(location: str):
    """The manifest under check: one that fails to load fails the check; none there (a wrong path) is
    a usage error."""
    from medsapiens.io.manifest import ManifestError, NoManifest, load

    try:
        return load(location)
    except NoManifest:
        raise
    except ManifestError as exc:
        raise CheckFailed(str(exc)) from exc


def check_sheet(sheet: str | None, n: int) -> None:
    """--sheet and --n, before any shard is read."""
    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    if sheet is None:
        return
    path = Path(sheet)
    if path.suffix.lower() != ".png" or path.is_dir():
        raise InputError(f"--sheet {sheet}: name the PNG file to write (SHEET.png)")
    if not path.parent.is_dir():
        raise InputError(f"--sheet {sheet}: no folder {path.parent}")


def run_inspect(args) -> int:
    from medsapiens.io.manifest import ManifestError
    from medsapiens.io.record import Rejection
    from medsapiens.io.shard_tar import ShardError
    from medsapiens.shards.inspection import inspect

    check_sheet(args.sheet, args.n)
    manifest = load_manifest(args.location)
    try:
        lines = inspect(manifest, args.sheet, args.n)
    except (ManifestError, ShardError, Rejection, FileNotFoundError) as exc:  # the shards fail a check
        raise CheckFailed(str(exc)) from exc
    print("\n".join(lines))
    return 0


def run_verify(args) -> int:
    from medsapiens.shards.verify import unlisted_tars, verify

    manifest = load_manifest(args.location)
    problems, checked = verify(manifest)
    for problem in problems:
        print(problem)
    extra = unlisted_tars(manifest)
    if extra:
        print(f"note: {len(extra)} tar file(s) beside the manifest are not in it (an earlier build's?), not checked and "
              f"never read by training: {', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}")
    if problems:
        raise CheckFailed(f"{len(problems)} problem(s) in {manifest.location}")
    print(f"{manifest.location}: {len(manifest.shards)} shard(s), {checked} samples verified, no problems")
    return 0
