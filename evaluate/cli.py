"""`medsapiens evaluate`, `medsapiens predict` and `medsapiens calibrate`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medsapiens.cli import count, positive_int
from medsapiens.errors import CheckFailed, InputError
from medsapiens.io import storage


def register(subparsers) -> None:
    ev = subparsers.add_parser(
        "evaluate", help="MRE/SDR of a bundle on a shard split, or of prediction files",
        description="Score landmarks by the dataset's protocol (head 0.1 mm/px, hand wrist width 50 mm, "
        "chest 512x512 frame px, leg per-image spacing) in original-image pixels. Writes report.json, "
        "report.md and per_image.csv to --out.")
    ev.add_argument("--bundle", help="bundle directory")
    ev.add_argument("--compare", nargs="+", metavar="REPORT_JSON",
                    help="compare evaluation reports side by side (MRE +- both stds, every SDR, per-landmark deltas "
                    "to the first) with a paired sign-flip test on the images they share; prints the table "
                    "(and writes it to --out/compare.md and compare.json when --out is given)")
    ev.add_argument("--shards", help="shard directory or s3:// prefix (with --bundle)")
    ev.add_argument("--dataset", help="dataset id (default: the bundle's only head; with --predictions, the files' "
                    "dataset, which it must match, else the protocol to score them by)")
    ev.add_argument("--split", help="split to evaluate (with --bundle; default test); splits joined by '+' are "
                    "scored as one, e.g. test1+test2 for ISBI 2015's 250 test images")
    ev.add_argument("--flip-test", action=argparse.BooleanOptionalAction,
                    help="average with the mirrored image, as MedSapiens evaluates (with --bundle; default on; "
                    "--no-flip-test)")
    ev.add_argument("--predictions", help='predict\'s predictions.json ({"dataset": ID, "landmarks": {id: [[x, y], '
                    '...]}}, original pixels) or a COCO results file ([{image_id, keypoints}])')
    ev.add_argument("--ground-truth", help="JSON like predictions.json (null = invisible; may add spacing_mm and "
                    "image_size per id, names, landmark_set; no other key) or COCO keypoints (v = 0 invisible; ids are file_name stems)")
    ev.add_argument("--out", help="report directory (required, except with --compare)")
    ev.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out (its files and "
                    "overlays; without it such an --out is refused)")
    ev.add_argument("--overlays", type=count, metavar="N", help="write N overlay PNGs (with --bundle; default 0)")
    ev.add_argument("--hand-landmarks", type=index_pair, default=None, metavar="A,B",
                    help="hand protocol: the two wrist landmarks (default 1,5 as Payer; GU2Net uses 0,4)")
    ev.add_argument("--sdr-convention", choices=["<", "<="], help="SDR counts error < r (default) or <= r")
    ev.add_argument("--batch-size", type=positive_int, help="images per forward pass (with --bundle; default 8)")
    ev.add_argument("--device", help="cpu (default) or cuda (with --bundle)")
    ev.set_defaults(func=_evaluate)

    pr = subparsers.add_parser(
        "predict", help="landmarks on new images (PNG, JPG, BMP, TIFF, DICOM)",
        description="Predict landmarks in original-image pixels (and mm when the spacing is known) for "
        "images or folders of images. Writes <id>.json per image, predictions.json and failures.json. "
        "An input that cannot be read is listed in failures.json with its reason and the others go on: "
        "the exit status is 0 when at least one image was predicted, 1 when none was, 2 for a usage error.")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    pr.add_argument("--bundle", help="bundle directory (runs on torch)")
    pr.add_argument("--onnx", metavar="MODEL.onnx", help="a model from `medsapiens export onnx`, run on onnxruntime "
                    "alone (no torch needed: pip install 'medsapiens[onnx]'); flip test as exported")
    pr.add_argument("--dataset", help="which head (default: the bundle's only head)")
    pr.add_argument("--out", default="predictions", help="output directory (default ./predictions)")
    pr.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=None,
                    help="average with the mirrored image (default on; --no-flip-test; an ONNX model as exported)")
    pr.add_argument("--overlays", action="store_true", help="also write overlay PNGs")
    pr.add_argument("--overwrite", action="store_true", help="replace the predictions of an earlier run in --out "
                    "(its per-image files and summaries; without it such an --out is refused)")
    pr.add_argument("--spacing", metavar="SX,SY",
                    help="mm per pixel (x, y), two positive numbers; wins over the DICOM tags")
    pr.add_argument("--frame", type=count, metavar="N", help="which frame of multi-frame DICOMs and page of "
                    "multi-page TIFFs (0-based); without it they are listed as failures")
    pr.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass (default 8)")
    pr.add_argument("--device", default="cpu", help="cpu or cuda (with --onnx: cpu, onnxruntime runs on the CPU)")
    pr.set_defaults(func=_predict)

    ca = subparsers.add_parser(
        "calibrate", help="per-landmark error radii with a coverage guarantee (split conformal), stored in a bundle",
        description="Split conformal calibration on the val split (a test split, or the split the bundle trained on, "
        "is refused): for each landmark "
        "the radius r (protocol unit: mm, or px) such that a new image's true landmark lies within r of the "
        "prediction with probability >= --coverage. r is the ceil((n+1)*coverage)-th smallest of the n "
        "calibration errors (coverage >= the level; <= level + 1/(n+1) without ties). Written into the "
        "bundle's config.json; predict then writes each landmark's radius and evaluate its empirical coverage. "
        "`medsapiens finetune` calibrates its output bundle itself.")
    ca.add_argument("bundle", help="bundle directory (its config.json is updated)")
    ca.add_argument("--shards", required=True, help="shard directory or s3:// prefix")
    ca.add_argument("--dataset", help="which head (default: the bundle's only head)")
    ca.add_argument("--split", default="val",
                    help="calibration split (default val; never a test split or the training split)")
    ca.add_argument("--coverage", type=float, default=0.9, help="nominal coverage 1 - alpha (default 0.9)")
    ca.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=True,
                    help="predict as evaluate and predict do by default (on; --no-flip-test)")
    ca.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass (default 8)")
    ca.add_argument("--device", default="cpu", help="cpu or cuda")
    ca.set_defaults(func=_calibrate)


def index_pair(text: str) -> tuple[int, int]:
    """Two distinct 0-based landmark indices A,B (checked against the landmark set's K once it is known)."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) == int(parts[1]):
        raise argparse.ArgumentTypeError(f"expected two different 0-based landmark indices A,B, got {text!r}")
    return int(parts[0]), int(parts[1])


def check_out(out: str | None) -> None:
    """--out must be a folder, or a path one can create: refused before any work, not after it."""
    if out is None:
        return
    clash = storage.file_in_the_way(Path(out))
    if clash is not None:
        raise InputError(f"--out {out}: {clash} is a file, not a folder")


def check_device(device: str, onnx=None) -> None:
    """cpu or an available cuda device, before any model is loaded; an ONNX model runs on the CPU."""
    if onnx:
        if device != "cpu":
            raise InputError(f"--device {device} with --onnx: onnxruntime runs this model on the CPU; drop --device "
                             "or use --bundle to run on a GPU")
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: {torch.cuda.device_count()} CUDA device(s) available here")


# What each way of evaluating reads; a flag another way reads is refused rather than ignored.
BUNDLE_ONLY = ("shards", "split", "overlays", "flip_test", "batch_size", "device")
FILES_AND_BUNDLE = ("bundle", "predictions", "ground_truth", "dataset", "hand_landmarks", "sdr_convention")


def refuse_unread(args, unread: tuple[str, ...], mode: str) -> None:
    given = [f"--{name.replace('_', '-')}" for name in unread if getattr(args, name) is not None]
    if given:
        raise InputError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not read {mode}")


def _evaluate(args) -> int:
    check_out(args.out)
    if args.compare:
        refuse_unread(args, BUNDLE_ONLY + FILES_AND_BUNDLE, "with --compare (it reads the reports)")
        from medsapiens.evaluate.compare import compare_reports

        text = compare_reports(args.compare, args.out)
        print(text)
        return 0
    if not args.out:
        raise InputError("give --out DIR for the report")
    from medsapiens.evaluate.evaluate import EvalOptions, evaluate_bundle, summary_line
    from medsapiens.evaluate.report import refuse_earlier_report, remove_earlier_report

    if not args.overwrite:
        refuse_earlier_report(Path(args.out))

    wrist_landmarks = args.hand_landmarks
    if args.predictions or args.ground_truth:
        if not (args.predictions and args.ground_truth) or args.bundle:
            raise InputError("give --predictions and --ground-truth together, without --bundle")
        refuse_unread(args, BUNDLE_ONLY, "with --predictions and --ground-truth (they are the images scored)")
        from medsapiens.evaluate.report import score_files, write_report

        report, errors, ids = score_files(args.predictions, args.ground_truth, wrist_landmarks,
                                          args.sdr_convention or "<", args.dataset)
        remove_earlier_report(Path(args.out))
        write_report(report, errors, ids, list(report["per_landmark"]), args.out)
    else:
        if not (args.bundle and args.shards):
            raise InputError("give --bundle and --shards, or --predictions and --ground-truth")
        args.split, device = args.split or "test", args.device or "cpu"
        check_device(device)
        options = EvalOptions(args.flip_test is not False, args.batch_size or 8, device, args.overlays or 0,
                              wrist_landmarks, args.sdr_convention or "<")
        report = evaluate_bundle(args.bundle, args.shards, args.dataset, args.split, args.out, options)
    print(summary_line(report))
    if "coverage" in report:
        c = report["coverage"]
        print(f"conformal coverage on {args.split}: {c['overall']:.1%} (nominal {c['nominal']:.0%}, "
              f"calibrated on {c['calibrated_on']!r})")
    if "coverage_not_measured" in report:
        print(f"conformal coverage not measured: {report['coverage_not_measured']}")
    print(f"report: {args.out}/report.json, {args.out}/report.md, {args.out}/per_image.csv")
    return 0


def _predict(args) -> int:
    from medsapiens.evaluate.predict import PredictOptions, predict
    from medsapiens.io.imageio import positive_pair

    spacing = None if args.spacing is None else positive_pair(args.spacing.split(","))
    if args.spacing is not None and spacing is None:
        raise InputError(f"--spacing must be two positive numbers SX,SY (mm per pixel), got {args.spacing!r}")
    if bool(args.bundle) == bool(args.onnx):
        raise InputError("give --bundle DIR or --onnx MODEL.onnx (one of them)")
    check_out(args.out)
    check_device(args.device, args.onnx)
    options = PredictOptions(args.dataset, args.flip_test, args.overlays, args.batch_size, spacing, args.device,
                             args.frame, args.overwrite)
    results, failures = predict(args.inputs, args.out, options, bundle_dir=args.bundle, onnx=args.onnx)
    print(f"{len(results)} image(s) predicted, {len(failures)} failed (listed in {args.out}/failures.json); "
          f"written to {args.out}/")
    for failure in failures:
        print(f"  failed: {failure['image']}: {failure['reason']}: {failure['detail']}", file=sys.stderr)
    if failures and not results:
        raise CheckFailed(f"none of the {len(failures)} input(s) could be predicted")
    return 0


def _calibrate(args) -> int:
    from medsapiens.evaluate.evaluate import EvalOptions, calibrate_bundle

    check_device(args.device)
    calibration = calibrate_bundle(args.bundle, args.shards, args.dataset, args.split, args.coverage,
                                   EvalOptions(args.flip_test, args.batch_size, args.device))
    radii = calibration["radii"]
    print(f"calibrated on {calibration['images']} {args.split!r} images at {args.coverage:.0%} coverage: radii "
          f"{min(radii):.3f}..{max(radii):.3f} {calibration['unit']} (median {sorted(radii)[len(radii) // 2]:.3f}); "
          f"stored in {args.bundle}/config.json")
    return 0
