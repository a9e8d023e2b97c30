"""The writer side of a build: one worker process turns one planned shard into a tar file.

A shard is written under a temporary name and renamed (or, for S3, staged locally and uploaded);
only then is its `<shard>.stats.json` written. The stats file is the resume marker: a shard whose
stats exist with a matching fingerprint is complete. Tar members have fixed metadata so a rebuild
is byte-identical.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsapiens.io import imageio as images
from medsapiens.io import processes, storage
from medsapiens.io.record import (
    Rejection,
    check_landmarks,
    check_spacing,
    make_record,
    resized_size,
    sample_key,
    validate_record,
)
from medsapiens.io.registry import LandmarkSet
from medsapiens.io.shard_tar import add_sample, file_digest, open_writer
from medsapiens.shards.plan import rejection_entry
from medsapiens.shards.readers import RawSample

PARTIAL_SUFFIX = ".partial"
_progress = None  # a multiprocessing queue of finished-sample counts, set in each worker
_stopping = None  # a multiprocessing event the build sets when it stops early, set in each worker


@dataclass(frozen=True)
class ShardTask:
    name: str  # without .tar
    out: str
    dataset: str
    split: str
    samples: tuple[RawSample, ...]
    landmark_set: LandmarkSet
    max_side: int
    outside: str
    fingerprint: str
    options_digest: str
    settings: dict  # the build options behind options_digest, kept in the stats to explain a mismatch
    multipart_threshold: int

    @property
    def url(self) -> str:
        return storage.join(self.out, f"{self.name}.tar")

    @property
    def stats_url(self) -> str:
        return storage.join(self.out, f"{self.name}.stats.json")


def init_worker(progress_queue, stopping, build_pid: int) -> None:
    """A worker process: progress goes to `progress_queue`, whose unread counts must not keep the worker
    from exiting once the build stops reading them (an interrupted build); no shard begins once
    `stopping` is set; a Ctrl-C that came while it started (born with it blocked) is dropped, not a
    KeyboardInterrupt traceback from its imports, and later ones end its shard as before; and the
    worker ends with the build's process `build_pid`, however that ends (Linux), instead of waiting
    for tasks that never come."""
    global _progress, _stopping
    _progress, _stopping = progress_queue, stopping
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # discards a pending one
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    progress_queue.cancel_join_thread()
    end_with(build_pid)


def end_with(parent_pid: int) -> None:
    """SIGTERM this process when its parent's thread that started it ends: the pool starts its workers
    from the build's main thread."""
    if processes.sigterm_when_parent_ends() and os.getppid() != parent_pid:
        os._exit(1)  # it ended while this worker started, before the request was in place


def stored_sample(raw: RawSample, landmark_set: LandmarkSet, max_side: int, outside: str) -> tuple[np.ndarray, dict]:
    """(stored pixels, record) for one input, or a `Rejection` saying why it cannot be stored."""
    check_spacing(raw.spacing_mm)
    pixels = images.decode(raw.image)
    size = images.size_of(pixels)
    if raw.expected_size is not None and tuple(raw.expected_size) != size:
        w, h = raw.expected_size
        raise Rejection("bad_annotation", f"annotation says {w}x{h} but {raw.image} is {size[0]}x{size[1]}")
    visible = check_landmarks(raw.landmarks, raw.visible, landmark_set.num_landmarks, size, outside)
    stored_size = resized_size(size, max_side)
    record = make_record(
        dataset=landmark_set.id, split=raw.split, source_id=raw.source_id, landmarks_orig=raw.landmarks,
        visible=visible, spacing_orig=raw.spacing_mm, normalization=landmark_set.normalization,
        orig_size=size, stored_size=stored_size, names=landmark_set.names,
    )
    validate_record(record, stored_size, landmark_set.num_landmarks)
    return images.resize(pixels, stored_size), record



def write_tar(path: Path, task: ShardTask) -> tuple[list[str], list[dict]]:
    keys, rejected = [], []
    with open_writer(path) as tar:
        for raw in task.samples:
            key = sample_key(task.dataset, raw.split, raw.source_id)
            try:
                pixels, record = stored_sample(raw, task.landmark_set, task.max_side, task.outside)
                add_sample(tar, key, pixels, record)
            except Rejection as exc:
                rejected.append(rejection_entry(task.dataset, raw.image, raw.source_id, exc.reason, exc.detail,
                                                raw.split))
            except Exception as exc:  # a bug or an I/O failure, not bad data: stop, naming the sample
                raise RuntimeError(f"sample {raw.source_id!r} ({raw.image}): {exc!r}") from exc
            else:
                keys.append(key)
            if _progress is not None:
                _progress.put(1)
    return keys, rejected



STAGING_PREFIX = "medsapiens-shard-"


def remove_stale_staging() -> None:
    """Temp dirs of S3 builds whose process is gone (killed: no `finally` ran), named by its pid."""
    for folder in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        pid = folder.name.removeprefix(STAGING_PREFIX).split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def staging_path(task: ShardTask):
    """Where the tar is written first: beside its final name locally, a temp dir for S3."""
    if storage.is_s3(task.out):
        folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
        try:
            yield folder / f"{task.name}.tar"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    path = Path(task.out, f".{task.name}.tar.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def publish(path: Path, task: ShardTask) -> None:
    if storage.is_s3(task.out):
        storage.upload_file(path, task.url, multipart_threshold=task.multipart_threshold)
    else:
        with open(path, "rb") as written:  # on disk before its stats file says it is finished
            os.fsync(written.fileno())
        os.replace(path, task.url)


def write_shard(task: ShardTask) -> dict:
    """Write one shard and its stats file; returns the stats. A shard whose every input is rejected
    leaves no tar, only stats with samples = 0."""
    if _stopping is not None and _stopping.is_set():
        raise RuntimeError(f"the build stopped before shard {task.url} began")
    with staging_path(task) as path:
        keys, rejected = write_tar(path, task)
        sha256, size = file_digest(path)
        if keys:
            publish(path, task)
    stats = {
        "shard": f"{task.name}.tar", "dataset": task.dataset, "split": task.split,
        "samples": len(keys), "keys": keys, "bytes": size if keys else 0, "sha256": sha256 if keys else None,
        "rejected": rejected, "fingerprint": task.fingerprint, "options_digest": task.options_digest,
        "options": task.settings,
    }
    storage.write_bytes(task.stats_url, (json.dumps(stats, indent=1) + "\n").encode())
    return stats
