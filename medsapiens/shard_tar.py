"""WebDataset tar shards: written byte-reproducibly (fixed member metadata, sha256 of the
result), and read back only as the manifest promised them.

The shard writer and the fine-tuning subsets both write through here, so every shard the
project makes has the same layout (`<key>.png`, `<key>.json`, ...) and `tar -tf` lists it.
Reading (training, evaluation, verify, inspect) accepts an uncompressed tar of at most the
manifest's byte count, no member larger than that, and checks its size and sha256 at the end.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from medsapiens.errors import UserError

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


COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class ShardError(UserError, ValueError):
    """A shard that is not what its manifest says (compressed, too long, another sha256)."""


class CheckedStream:
    """A read-only stream that counts and hashes every byte read and refuses to go past `limit`."""

    def __init__(self, stream, url: str, limit: int):
        self.stream, self.url, self.limit = stream, url, limit
        self.sha256, self.bytes, self.head = hashlib.sha256(), 0, b""

    def read(self, size: int = -1) -> bytes:
        room = self.limit + 1 - self.bytes  # one byte past the limit tells "longer" from "exact"
        data = self.stream.read(room if size < 0 else min(size, room))
        self.sha256.update(data)
        self.bytes += len(data)
        self.head = self.head or data[:8]
        if self.bytes > self.limit:
            raise ShardError(f"{self.url}: longer than the {self.limit} bytes its manifest lists")
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def check(self, sha256: str) -> None:
        """After draining: the byte count and sha256 the manifest promised."""
        if self.bytes != self.limit:
            raise ShardError(f"{self.url}: {self.bytes} bytes, the manifest says {self.limit}")
        if self.sha256.hexdigest() != sha256:
            raise ShardError(f"{self.url}: sha256 {self.sha256.hexdigest()}, the manifest says {sha256} "
                             "(the shard changed since it was built)")

    def close(self) -> None:
        self.stream.close()


def tar_samples(stream: CheckedStream):
    """(key, {extension: bytes}) for consecutive members sharing a key, as WebDataset groups them;
    an uncompressed tar only, no member larger than the shard."""
    key, sample = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.size > stream.limit:
                    raise ShardError(f"{stream.url}: member {member.name} claims {member.size} bytes, more than "
                                     f"the whole shard ({stream.limit})")
                member_key, _, extension = member.name.partition(".")
                if member_key != key and sample:
                    yield key, sample
                    sample = {}
                key = member_key
                sample[extension] = tar.extractfile(member).read()
    except tarfile.TarError as exc:
        kind = next((name for magic, name in COMPRESSED.items() if stream.head.startswith(magic)), None)
        if kind:
            raise ShardError(f"{stream.url}: a {kind}-compressed tar; shards are uncompressed tars") from None
        raise ShardError(f"{stream.url}: not a readable tar ({exc})") from None
    if sample:
        yield key, sample
