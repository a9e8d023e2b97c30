"""Writing WebDataset tar shards byte-reproducibly: fixed member metadata, sha256 of the result.

The shard writer and the fine-tuning subsets both write through here, so every shard the
project makes has the same layout (`<key>.png`, `<key>.json`, ...) and `tar -tf` lists it.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

MEMBER_MTIME = 0


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), MEMBER_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def open_writer(path: Path) -> tarfile.TarFile:
    return tarfile.open(path, "w", format=tarfile.GNU_FORMAT)


def write_samples(path: Path, samples) -> None:
    """samples: iterable of {"__key__": key, ext: bytes, ...} as WebDataset yields them."""
    with open_writer(path) as tar:
        for sample in samples:
            for ext, data in sorted(sample.items()):
                if not ext.startswith("__"):
                    add_member(tar, f"{sample['__key__']}.{ext}", data)


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest(), Path(path).stat().st_size
