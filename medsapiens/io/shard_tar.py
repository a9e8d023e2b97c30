"""The shard format, the one module that knows it: WebDataset tar shards of `<key>.png` (the
stored image, lossless, 8/16-bit grey or 8-bit RGB) + `<key>.json` (the record, medsapiens.io.record).

Writing (`shards build`, the fine-tuning subsets) is byte-reproducible: fixed member metadata, a
sha256 of the result; `tar -tf` and the webdataset library read the shards as they are. Reading
(training, evaluation, `shards verify`, `shards inspect`) goes through `read_shard`: an
uncompressed tar of at most the manifest's byte count, no member larger than that, its size and
sha256 checked at the end; `decode_pixels` / `decode_sample` turn a sample into pixels and a
validated record. A change of format is made here, and only here.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

from medsapiens.errors import UserError
from medsapiens.io import imageio, storage
from medsapiens.io.record import MAX_IMAGE_SIDE, Rejection, validate_record

MEMBER_MTIME = 0
IMAGE, RECORD = "png", "json"  # member extensions
MEMBERS = frozenset({IMAGE, RECORD})


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), MEMBER_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def add_sample(tar: tarfile.TarFile, key: str, pixels, record: dict) -> None:
    """One sample: its image encoded (PNG), then its record."""
    add_member(tar, f"{key}.{IMAGE}", imageio.encode_png(pixels))
    add_member(tar, f"{key}.{RECORD}", json.dumps(record).encode())


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


KEY = re.compile(r"[A-Za-z0-9_-]+")  # what record.sample_key makes


class ShardError(UserError, ValueError):
    """A shard that is not what its manifest says (compressed, too long, another sha256, missing)."""


class MissingShard(ShardError):
    """A shard its manifest lists that is not there."""


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
                if not KEY.fullmatch(member_key) or not extension:
                    raise ShardError(f"{stream.url}: member {member.name[:100]!r} is not named <key>.<extension> "
                                     "(a key of letters, digits, '_' and '-')")
                if member_key != key and sample:
                    yield key, sample
                    sample = {}
                key = member_key
                if extension in sample:
                    raise ShardError(f"{stream.url}: sample {key} has two {extension!r} members")
                sample[extension] = tar.extractfile(member).read()
    except tarfile.TarError as exc:
        kind = next((name for magic, name in COMPRESSED.items() if stream.head.startswith(magic)), None)
        if kind:
            raise ShardError(f"{stream.url}: a {kind}-compressed tar; shards are uncompressed tars") from None
        raise ShardError(f"{stream.url}: not a readable tar ({exc})") from None
    if sample:
        yield key, sample


def read_shard(manifest, shard):
    """Samples of one shard ({"__key__", "__url__", extension: bytes}), in order, as WebDataset
    gives them, read only as the manifest promised: its sha256 is checked at its end, a ShardError
    when it differs or when the shard is not there."""
    url = manifest.url_of(shard)
    seen: set[str] = set()
    try:
        raw = storage.open_stream(url)
    except FileNotFoundError:  # not the bare OS message: say whose list names it, and what checks them all
        raise MissingShard(f"{url}: missing, though {manifest.location} lists it "
                           "(`medsapiens shards verify` checks every shard)") from None
    with contextlib.closing(CheckedStream(raw, url, shard.bytes)) as stream:
        for key, members in tar_samples(stream):
            if key in seen:
                raise ShardError(f"{url}: sample {key} appears twice; a shard holds each key once")
            seen.add(key)
            yield {"__key__": key, "__url__": url, **members}
        stream.drain()
        stream.check(shard.sha256)
    if len(seen) != shard.samples:
        raise ShardError(f"{url}: {len(seen)} samples, the manifest says {shard.samples}")


def members_of(sample: dict) -> set[str]:
    return {name for name in sample if not name.startswith("__")}


def decode_pixels(sample: dict, max_side: int | None = None):
    """The stored image as numpy (H, W) uint8/uint16 or (H, W, 3) uint8; one with a side over
    `max_side` is refused from its header, before it is decoded."""
    return imageio.decode_png(sample[IMAGE], max_side)


def decode_sample(sample: dict, landmark_set=None, max_side: int = MAX_IMAGE_SIDE):
    """Shard sample -> (image as float32 (H, W) or (H, W, 3) on a 0-255 scale, validated record);
    a Rejection naming the sample and shard when either half is unreadable or inconsistent."""
    where = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
    missing = [part for part in (RECORD, IMAGE) if part not in sample]
    if missing:
        held = ", ".join(f".{part}" for part in sorted(members_of(sample))) or "nothing"
        raise Rejection("missing_annotation" if RECORD in missing else "missing_image",
                        f"{where}: no .{' or .'.join(missing)} part (it holds {held}): a shard cut short or written by "
                        "another tool? `medsapiens shards verify` checks every shard whole")
    try:
        meta = json.loads(sample[RECORD])
    except RecursionError:
        raise Rejection("bad_annotation", f"{where}: its record is JSON nested too deep to read") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise Rejection("bad_annotation", f"{where}: its record is not valid JSON ({exc})") from None
    try:
        pixels = decode_pixels(sample, max_side)
    except (OSError, ValueError) as exc:
        raise Rejection("unreadable_image", f"{where}: {exc}") from None
    if not isinstance(meta, dict):
        raise Rejection("bad_annotation", f"{where}: its record is not a JSON object")
    try:
        meta["visible"] = validate_record(meta, imageio.size_of(pixels),
                                          landmark_set.num_landmarks if landmark_set else None)
    except Rejection as exc:
        raise Rejection(exc.reason, f"{where}: {exc.detail}") from None
    return imageio.to_float(pixels), meta
