"""`medsapiens shards build`: plan (reader side), write shards in worker processes (writer side),
distribute and resume (this module), then the manifest and the rejection report.

Resume: a shard whose `<shard>.stats.json` exists with the planned fingerprint is skipped, so a
rerun after any interruption redoes exactly the unfinished shards. A rerun with other options on
the same output is refused unless `overwrite` is set. The manifest is removed before any shard is
written and written last, so it never describes shards a build began to replace.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue as queue_module
import signal
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from medsapiens import __version__
from medsapiens.errors import CheckFailed, InputError
from medsapiens.io import imageio as images
from medsapiens.io import jsondoc, processes, storage
from medsapiens.io.locks import writer_lock
from medsapiens.io.manifest import FORMAT as MANIFEST_FORMAT
from medsapiens.io.manifest import MANIFEST_NAME, REJECTED_NAME, DatasetInfo, Manifest, ShardInfo, manifest_url
from medsapiens.io.progress import progress_bar
from medsapiens.io.record import FIELDS, sample_key
from medsapiens.io.registry import LandmarkSet
from medsapiens.shards import (
    DEFAULT_MAX_SIDE,
    DEFAULT_MULTIPART_MB,
    DEFAULT_SHARD_SIZE,
    DEFAULT_WORKERS,
    OUTSIDE_CHOICES,
)
from medsapiens.shards.plan import (
    PlanError,
    Scan,
    SourceSpec,
    canonical_digest,
    input_fingerprint,
    open_source,
    scan_source,
    spacing_sources,
)
from medsapiens.shards.readers import RawSample
from medsapiens.shards.writer import PARTIAL_SUFFIX, ShardTask, init_worker, remove_stale_staging, write_shard


class BuildError(CheckFailed, RuntimeError):
    """The build stopped writing: the message names the shard at fault (exit status 1). An --out the
    build may not write into is an InputError (exit status 2)."""


@dataclass(frozen=True)
class BuildOptions:
    out: str
    max_side: int = DEFAULT_MAX_SIDE
    shard_size: int = DEFAULT_SHARD_SIZE
    outside: str = "reject"
    workers: int = DEFAULT_WORKERS
    overwrite: bool = False
    multipart_mb: int = DEFAULT_MULTIPART_MB
    progress: bool = True

    def check(self) -> None:
        for flag, value, least in (("--max-side", self.max_side, 16), ("--shard-size", self.shard_size, 1),
                                   ("--workers", self.workers, 1), ("--multipart-mb", self.multipart_mb, 5)):
            if value < least:
                raise PlanError(f"{flag} must be at least {least}, got {value}")
        storage.check_location(self.out)
        if not storage.is_s3(self.out) and Path(self.out).exists() and not Path(self.out).is_dir():
            raise PlanError(f"--out {self.out} is a file; the shards need a folder")
        if self.outside not in OUTSIDE_CHOICES:
            raise PlanError(f"--outside must be one of {', '.join(OUTSIDE_CHOICES)}, got {self.outside!r}")


@dataclass
class BuildResult:
    manifest: Manifest
    rejected: list[dict]
    shards_written: int
    shards_skipped: int


def output_settings(sources, options: BuildOptions) -> dict:
    """Everything that shapes the output; a rerun must match it to reuse finished shards."""
    return {
        "sources": [s.describe() for s in sources],
        "max_side": options.max_side, "shard_size": options.shard_size, "outside": options.outside,
        "png_compress_level": images.PNG_COMPRESS_LEVEL, "resample": images.RESAMPLE.name.lower(),
        "record_fields": list(FIELDS),
    }


def plan_tasks(sources, scan: Scan, options: BuildOptions, out: str, settings: dict, digest: str) -> list[ShardTask]:
    tasks = []
    for source in sources:
        dataset = source.spec.dataset
        by_split = defaultdict(list)
        for sample in scan.samples[dataset]:
            by_split[sample.split].append(sample)
        for split, samples in sorted(by_split.items()):
            samples.sort(key=lambda s: sample_key(dataset, split, s.source_id))
            for index, start in enumerate(range(0, len(samples), options.shard_size)):
                chunk = tuple(samples[start:start + options.shard_size])
                name = f"{dataset}-{split}-{index:06d}"
                fingerprint = canonical_digest(  # landmark names from a COCO file change no option
                    {"options": digest, "shard": name, "landmark_set": source.landmark_set.to_dict(),
                     "inputs": [input_fingerprint(s) for s in chunk]})
                tasks.append(ShardTask(
                    name, out, dataset, split, chunk, source.landmark_set, options.max_side, options.outside,
                    fingerprint, digest, settings, options.multipart_mb * 1024 * 1024,
                ))
    refuse_shared_names(tasks)
    return tasks


def refuse_shared_names(tasks: list[ShardTask]) -> None:
    """`<dataset>-<split>-NNNNNN`: ids and split names may hold '-', so two (dataset, split) pairs can name the same
    shard (x with split y-train, x-y with split train); the second would overwrite the first's file."""
    first: dict[str, ShardTask] = {}
    for task in tasks:
        other = first.setdefault(task.name, task)
        if other is not task:
            raise PlanError(f"dataset {other.dataset!r} split {other.split!r} and dataset {task.dataset!r} split "
                            f"{task.split!r} would both write shard {task.name}.tar: rename a dataset id or split")


def describe_difference(old: dict, new: dict) -> str:
    """Each setting that differs, by its path (`sources[0].options.val_fraction: "0.1" -> "0.3"`), at most 8."""
    old, new = leaves(old), leaves(new)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = "; ".join(f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in changed[:8])
    return (shown + ("; ..." if len(changed) > 8 else "")) or "unknown"


def leaves(value, path: str = "") -> dict:
    """A nested settings value as {path: leaf}: mappings by key, lists of mappings by index."""
    if isinstance(value, dict):
        return {k: v for key, inner in value.items() for k, v in leaves(inner, f"{path}.{key}" if path else key).items()}
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return {k: v for i, item in enumerate(value) for k, v in leaves(item, f"{path}[{i}]").items()}
    return {path: value}


def refuse_other_options(out: str, settings: dict, digest: str, overwrite: bool) -> None:
    """A finished manifest at `out` built with other options is not silently mixed with this build."""
    url = manifest_url(out)
    if overwrite or not storage.exists(url):
        return
    held = jsondoc.parse(storage.read_bytes(url), url)
    if not (isinstance(held, dict) and held.get("format") == MANIFEST_FORMAT):
        raise InputError(f"{url} is not a MedSapiens shard manifest: choose another --out (--overwrite would replace it)")
    old = held.get("build", {})
    if old.get("options_digest") != digest:
        old_settings = {k: old.get(k) for k in settings}
        raise InputError(f"{out} holds shards built with other options ({describe_difference(old_settings, settings)}); "
                         "pass --overwrite to replace them, or choose another --out")


def finished_stats(task: ShardTask, overwrite: bool) -> dict | None:
    """The stats of an already finished shard, or None when it must be (re)written: one of other options
    only with `overwrite`, so an interrupted overwrite resumes like any build."""
    try:
        stats = json.loads(storage.read_bytes(task.stats_url))
    except (FileNotFoundError, ValueError):
        return None
    if stats.get("options_digest") != task.options_digest:
        if overwrite:
            return None
        raise InputError(f"{task.stats_url} was written by a build with other options "
                         f"({describe_difference(stats.get('options', {}), task.settings)}); "
                         "pass --overwrite to replace it, or choose another --out")
    if stats.get("fingerprint") != task.fingerprint or (stats["samples"] and storage.size(task.url) != stats["bytes"]):
        return None  # changed inputs, or a shard deleted or cut short since
    return stats


def drain(progress_queue, bar) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue_module.Empty:
            return


def run_tasks(tasks: list[ShardTask], workers: int, bar) -> list[dict]:
    """Write the shards in a pool of worker processes, each shard whole in one worker."""
    if not tasks:
        return []
    context = multiprocessing.get_context("spawn")
    progress_queue, stopping = context.Queue(), context.Event()
    results = []
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context, initializer=init_worker,
                             initargs=(progress_queue, stopping, os.getpid())) as pool:
        with processes.children_born_blocking([signal.SIGINT]):  # the pool starts its workers on submit
            pending = {pool.submit(write_shard, task): task for task in tasks}
        try:
            while pending:
                done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                drain(progress_queue, bar)
                for future in done:
                    task = pending.pop(future)
                    try:
                        results.append(future.result())
                    except Exception as exc:
                        raise BuildError(f"writing shard {task.url} failed: {exc!r}; finished shards are kept, "
                                         "rerun the same command to resume") from exc
        except BaseException:  # a failed shard, Ctrl-C, a closed terminal: no shard begins after it
            stopping.set()  # the pool's own cancelling misses the tasks its workers have already taken
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        drain(progress_queue, bar)
    return results


def assemble_manifest(sources, scan: Scan, stats: list[dict], settings: dict, digest: str) -> tuple[Manifest, list]:
    stats = sorted(stats, key=lambda s: s["shard"])
    datasets = {}
    rejected = scan.rejected + [entry for s in stats for entry in s["rejected"]]
    for source in sources:
        dataset = source.spec.dataset
        splits = Counter()
        for s in stats:
            if s["dataset"] == dataset and s["samples"]:
                splits[s["split"]] += s["samples"]
        dropped = {e["id"] for s in stats if s["dataset"] == dataset for e in s["rejected"]}
        info = {**source.describe(), "spacing_from": spacing_sources(scan.samples[dataset]),
                "validation": as_written(scan.validation[dataset], dropped)}
        rejected_by_split = Counter(e["split"] for e in rejected if e["dataset"] == dataset and "split" in e)
        if rejected_by_split:  # what a split's evaluation lacks, so that its report can say so
            info["rejected_by_split"] = dict(sorted(rejected_by_split.items()))
        if no_spacing := unscorable_by_split(source.landmark_set, scan.samples[dataset], dropped):
            info["no_spacing_by_split"] = no_spacing
        if scan.unlabelled.get(dataset):
            info["unlabelled_images"] = scan.unlabelled[dataset]
        if dataset in scan.test:
            info["test"] = as_written(scan.test[dataset], dropped)
        datasets[dataset] = DatasetInfo(source.landmark_set, dict(splits), info)
    shards = [ShardInfo(s["shard"], s["dataset"], s["split"], s["samples"], s["bytes"], s["sha256"])
              for s in stats if s["samples"]]
    build_info = {**settings, "options_digest": digest, "medsapiens_version": __version__}
    manifest = Manifest(datasets, shards, scan.inputs, len(rejected), build_info)
    manifest.validate()
    return manifest, rejected


def unscorable_by_split(landmark_set: LandmarkSet, samples: list[RawSample], dropped: set[str]) -> dict[str, int]:
    """Per split, the written images of a dataset scored in mm that have no pixel spacing (validation,
    evaluation and calibration refuse such a split before predicting it)."""
    if not landmark_set.needs_spacing:
        return {}
    return dict(sorted(Counter(s.split for s in samples if s.spacing_mm is None and s.source_id not in dropped).items()))


def as_written(carve: dict, dropped: set[str]) -> dict:
    """A carve's record as the shards hold it: carved ids the writer rejected move from `ids` (the split's
    samples, as verify checks them) to `rejected_ids`."""
    lost = [i for i in carve.get("ids", []) if i in dropped]
    if not lost:
        return carve
    return {**carve, "ids": [i for i in carve["ids"] if i not in dropped], "rejected_ids": lost}


def prepare_output(out: str) -> None:
    """Create a local output directory and clear temp files an interrupted build left behind."""
    if storage.is_s3(out):
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    for leftover in Path(out).glob(f".*.tar.*{PARTIAL_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def open_sources(specs: list[SourceSpec]):
    ids = [s.dataset for s in specs]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise PlanError(f"dataset id(s) {', '.join(repeated)} given by more than one --source: give one --source "
                        "per dataset; for COCO or DICOM sets split over several JSONs, point it at their folder, "
                        "each JSON's split taken from _train_/_val_/_test_ in its name, or carve a test split "
                        "from one JSON with --opt ID.test_fraction=F (docs/splits.md)")
    if not specs:
        raise PlanError("nothing to build: give at least one --source ID=PATH")
    return [open_source(spec) for spec in specs]


def build(specs: list[SourceSpec], options: BuildOptions) -> BuildResult:
    options.check()
    remove_stale_staging()
    out = options.out if storage.is_s3(options.out) else str(Path(options.out).resolve())
    sources = open_sources(specs)
    scan = Scan()
    for source in sources:
        scan_source(source, scan)
    settings = output_settings(sources, options)
    digest = canonical_digest(settings)
    tasks = plan_tasks(sources, scan, options, out, settings, digest)
    with contextlib.nullcontext() if storage.is_s3(out) else writer_lock(Path(out), "shards build"):
        prepare_output(out)
        refuse_other_options(out, settings, digest, options.overwrite)
        finished = {t.name: finished_stats(t, options.overwrite) for t in tasks}
        todo = [t for t in tasks if finished[t.name] is None]
        total, skipped = sum(len(t.samples) for t in tasks), sum(len(t.samples) for t in tasks if finished[t.name])
        if todo:  # until the new one is written, no manifest describes shards this build may replace
            storage.remove(manifest_url(out))
        with progress_bar(total=total, initial=skipped, unit="img", desc="shards", disable=not options.progress) as bar:
            written = run_tasks(todo, options.workers, bar)
        stats = [s for s in finished.values() if s is not None] + written
        manifest, rejected = assemble_manifest(sources, scan, stats, settings, digest)
        storage.write_bytes(storage.join(out, REJECTED_NAME), "".join(json.dumps(r) + "\n" for r in rejected).encode())
        storage.write_bytes(storage.join(out, MANIFEST_NAME), manifest.to_json())
    manifest.location = out
    return BuildResult(manifest, rejected, len(todo), len(tasks) - len(todo))


def validation_text(record: dict, split: str = "val") -> str:
    if record.get("rule") == "carved from train":
        lost = f" ({len(record['rejected_ids'])} more rejected when written)" if record.get("rejected_ids") else ""
        return (f"{split} carved from train: {len(record['ids'])} id(s){lost}, fraction {record['fraction']:g}, "
                f"seed {record['seed']}")
    return f"{split}: {record.get('rule', 'unknown')}"


def missing_splits(splits: dict[str, int]) -> list[str]:
    """Which of train, val and test (any test* split) a dataset has no sample in."""
    present = {split for split, count in splits.items() if count}
    return [s for s in ("train", "val") if s not in present] + \
        ([] if any(s.startswith("test") for s in present) else ["test"])


def dataset_summary(name: str, info: DatasetInfo) -> list[str]:
    splits = ", ".join(f"{split} {count}" for split, count in sorted(info.splits.items())) or "no samples"
    validation = validation_text(info.source.get("validation", {}))
    if info.source.get("test"):
        validation += "; " + validation_text(info.source["test"], "test")
    line = f"  {name} (K={info.landmark_set.num_landmarks}): {splits}; {validation}"
    if info.source.get("unlabelled_images"):
        line += f"; {info.source['unlabelled_images']} unlabelled image(s) are not inputs"
    lines = [line]
    if missing := missing_splits(info.splits):
        lines.append(f"  warning: {name} has no {', '.join(missing)} split: its split rule leaves it empty for these "
                     "inputs (options and rules: docs/splits.md)")
    if no_spacing := info.source.get("no_spacing_by_split"):
        counts = ", ".join(f"{split} {n}" for split, n in no_spacing.items())
        lines.append(f"  warning: {name} is scored in mm, but images have no pixel spacing ({counts}): validation, "
                     "evaluate and calibrate refuse a split that holds any (where a layout takes spacing from: "
                     "docs/shards.md)")
    return lines


def summary_lines(result: BuildResult) -> list[str]:
    """What a build did, in the words `inputs = written + rejected`, and how each dataset was split."""
    m = result.manifest
    lines = [f"inputs {m.inputs} = written {m.written} + rejected {m.rejected} "
             f"({result.shards_written} shard(s) written, {result.shards_skipped} already complete)"]
    for reason, count in sorted(Counter(r["reason"] for r in result.rejected).items()):
        lines.append(f"  rejected {reason}: {count}")
    for name, info in sorted(m.datasets.items()):
        lines += dataset_summary(name, info)
    lines.append(f"manifest {storage.join(m.location, MANIFEST_NAME)}; rejections {storage.join(m.location, REJECTED_NAME)}")
    return lines
