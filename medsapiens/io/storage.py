"""Local paths and s3://bucket/key URLs behind one small interface.

S3 goes through boto3 with the standard credential and endpoint chain (environment, profile,
instance role; `AWS_ENDPOINT_URL` honoured). One retry policy, ours: botocore's retries are off,
every request has connect and read timeouts, transient failures are retried with exponential
backoff (each retry printed) within a bounded number of attempts and time, and a request that
gives up, or a stream that breaks, is an S3Error naming the object. Nothing here prints or logs
credentials: messages name URLs only.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

from medsapiens.errors import InputError, UserError

MULTIPART_THRESHOLD = 64 * 1024 * 1024


@dataclass(frozen=True)
class S3Limits:
    """Bounds on every S3 request; each is overridable by an environment variable MEDSAPIENS_S3_<NAME>
    (e.g. MEDSAPIENS_S3_READ_TIMEOUT_S=20), read by every process, the build's workers included."""

    attempts: int = 6  # per request, ours only: botocore's own retries are off
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0  # per socket read: a silent endpoint fails an attempt after this
    give_up_after_s: float = 300.0  # no retry starts after this much time on one request


def limits() -> S3Limits:
    values = {}
    for f in fields(S3Limits):
        name = f"MEDSAPIENS_S3_{f.name.upper()}"
        if name in os.environ:
            try:
                values[f.name] = (int if f.name == "attempts" else float)(os.environ[name])
                if values[f.name] <= 0:
                    raise ValueError
            except ValueError:
                raise InputError(f"{name}={os.environ[name]!r}: must be a positive number") from None
    return S3Limits(**values)


class S3Error(UserError, RuntimeError):
    """An S3 request that failed for good (after the retries), naming the object."""


class S3Refusal(S3Error):
    """An S3 answer that refuses the request (no such bucket, access denied): that object's, not the endpoint's."""


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


OTHER_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/")  # s3:/b, S3://b, gs://b: meant as a URL, not a local path


def check_location(location) -> None:
    """Refuse a location that looks like a URL but not s3://BUCKET/...: a typo such as `s3:/` or `S3://`
    would otherwise become a local folder of that name, and the data would never reach the bucket."""
    text = str(location)
    if not is_s3(text) and OTHER_URL.match(text):
        raise InputError(f"{text}: neither s3://BUCKET/PREFIX nor a local path (URLs are read and written on S3 "
                         "only, spelled s3:// in lower case)")
    if is_s3(text):
        split_s3(text)


def join(base: str, *names: str) -> str:
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *names])
    return str(Path(base, *names))


def split_s3(url: str) -> tuple[str, str]:
    """(bucket, key), split at the first '/' only: '#' and '?' are part of a key, not a URL's fragment or query."""
    bucket, _, key = str(url).removeprefix("s3://").partition("/")
    if not is_s3(url) or not bucket:
        raise InputError(f"{url}: names no bucket; give s3://BUCKET/PREFIX")
    if not BUCKET_NAME.fullmatch(bucket):
        raise InputError(f"{url}: {bucket!r} is not a bucket name (letters, digits, '.', '-' and '_')")
    return bucket, key.lstrip("/")


BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


@functools.lru_cache(maxsize=None)
def _client_for_pid(pid: int):
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ProfileNotFound
    from botocore.handlers import add_expect_header

    bounds = limits()
    try:
        client = boto3.client("s3", config=Config(connect_timeout=bounds.connect_timeout_s,
                                                  read_timeout=bounds.read_timeout_s, retries={"total_max_attempts": 1}))
    except ProfileNotFound as exc:
        raise InputError(f"S3: {exc}: set AWS_PROFILE to a profile of your AWS config, or unset it") from None
    except BotoCoreError as exc:  # a config file that does not parse, a region that is no region name
        raise InputError(f"S3: {without_userinfo(str(exc))}") from None
    except ValueError as exc:
        if not str(exc).startswith("Invalid endpoint"):
            raise
        raise InputError(f"S3: {without_userinfo(str(exc))}: the endpoint (AWS_ENDPOINT_URL or the profile's endpoint_url) must be a URL "
                         "with its scheme, e.g. http://127.0.0.1:9000") from None
    # botocore asks for `100 Continue` before a file's body, and reads an answer that ends after its status
    # line forever, at full CPU, where no timeout applies: the body goes without asking
    client.meta.events.unregister("before-call.s3", add_expect_header)
    return client


def s3_client():
    """One client per process: boto3 clients must not cross a fork (DataLoader workers, pools)."""
    return _client_for_pid(os.getpid())


def _answer(exc: BaseException):
    """The S3 error answer behind `exc` (a botocore ClientError), also where boto3's upload_file wraps
    it in an S3UploadFailedError; None for a failure with no answer (a connection, a timeout)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    if isinstance(exc, S3UploadFailedError):
        exc = exc.__context__
    return exc if isinstance(exc, ClientError) else None


def _code_and_status(answer) -> tuple[str, int]:
    return (answer.response.get("Error", {}).get("Code", ""),
            answer.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _transient(exc: Exception) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError

    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, ConnectionError,
                        TimeoutError)):  # read timeouts and bodies cut short too
        return True
    answer = _answer(exc)
    if answer is None:
        return False
    code, status = _code_and_status(answer)
    return status >= 500 or code in ("Throttling", "SlowDown", "RequestTimeout")


def with_retries(what: str, fn, *args, **kwargs):
    """Call fn, retrying transient S3 errors with exponential backoff and jitter, each retry
    printed; at most `attempts` and none started after `give_up_after_s` (then S3Error). Any other
    S3 answer but a missing object (no such bucket, access denied) is an S3Error at once."""
    bounds, started = limits(), time.monotonic()
    for attempt in range(1, bounds.attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - filtered by _transient
            if not _transient(exc):
                answer = _answer(exc)
                if answer is None or _not_found(exc):  # a missing object is the caller's to judge
                    raise
                code, status = _code_and_status(answer)
                message = answer.response.get("Error", {}).get("Message", "")
                raise S3Refusal(f"{what}: {code or 'refused'} (HTTP {status}){': ' + message if message else ''}") from None
            delay = min(30.0, 0.2 * 2**attempt) * (0.5 + random.random())
            elapsed = time.monotonic() - started
            if attempt == bounds.attempts or elapsed + delay > bounds.give_up_after_s:
                raise S3Error(f"{what}: gave up after {attempt} attempt(s) in {elapsed:.0f} s: "
                              f"{type(exc).__name__}: {without_userinfo(str(exc))}") from None
            print(f"warning: {what} failed ({type(exc).__name__}), retry {attempt} of {bounds.attempts - 1} in "
                  f"{delay:.1f} s", file=sys.stderr)
            time.sleep(delay)
    raise AssertionError("unreachable")


def without_userinfo(text: str) -> str:
    """Text quoting a URL, with any user:password@ in it masked: an endpoint URL may carry a proxy's credentials."""
    return USERINFO.sub("//***@", text)


USERINFO = re.compile(r"//[^/\s\"']+@")  # to the last '@' before the host: a password may hold one


def _not_found(exc: Exception) -> bool:
    answer = _answer(exc)
    return answer is not None and _code_and_status(answer)[0] in ("404", "NoSuchKey", "NotFound")


def read_bytes(url: str, limit: int | None = None) -> bytes:
    """The whole file or object; with `limit`, at most limit + 1 bytes (enough to tell it is larger)."""
    amount = None if limit is None else limit + 1
    if not is_s3(url):
        with open(url, "rb") as f:
            return f.read(amount)
    bucket, key = split_s3(url)

    def get() -> bytes:  # a connection cut while the body is read is retried like a failed request
        from botocore.exceptions import IncompleteReadError

        answer = s3_client().get_object(Bucket=bucket, Key=key)
        with contextlib.closing(answer["Body"]) as body:
            data = body.read(amount)
        expected = answer["ContentLength"] if amount is None else min(answer["ContentLength"], amount)
        if len(data) < expected:  # botocore checks the length only of a read to the end
            raise IncompleteReadError(actual_bytes=len(data), expected_bytes=expected)
        return data

    try:
        return with_retries(f"get {url}", get)
    except Exception as exc:
        if _not_found(exc):
            raise FileNotFoundError(f"no such object: {url}") from None
        raise


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object; local files appear atomically (temp name, then rename)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        with_retries(f"put {url}", s3_client().put_object, Bucket=bucket, Key=key, Body=data)
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        with local_write(path, Path(tmp.name)):
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
    as_umask_allows(tmp.name)
    os.replace(tmp.name, path)


def check_new_file(out: Path, what: str, force: bool) -> None:
    """`--out` names the file to write, `what` (e.g. MODEL.onnx, with its suffix): never a folder, and an
    existing file is replaced only with `force`."""
    suffix = Path(what).suffix
    if out.suffix.lower() != suffix:
        raise InputError(f"--out {out}: name the file {what}")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; name the file {what}")
    if out.exists() and not force:
        raise InputError(f"--out {out} exists; pass --force to replace it")


def file_in_the_way(folder: Path) -> Path | None:
    """The file at `folder` or above it that keeps a folder from being made there (the nearest path that
    exists, when it is no folder); None when there is none."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


FULL_DISK_BYTES = 16 << 20  # a failed write with less free space than this is taken for a full disk


def full_disk_message(exc: BaseException, where: Path) -> str | None:
    """What to say when a failed write was the disk running full, else None: ENOSPC or its message
    (safetensors' error), or an error that lost both (torch's writer raises `enforce fail at
    inline_container.cc`) on a file system with next to no space left; that guess shows the error."""
    if not isinstance(exc, Exception):
        return None
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in str(exc):
        return f"writing {where}: no space left on its device; free space, then rerun"
    existing = next((p for p in (Path(where), *Path(where).parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    if free >= FULL_DISK_BYTES:
        return None
    error = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return (f"writing {where}: no space left on its device ({free >> 10} KiB free; the writer said: {error}); "
            "free space, then rerun")


@contextlib.contextmanager
def local_write(target: Path, *temporaries: Path):
    """Around a local write of `target` through `temporaries`: on any failure the temporaries are
    removed, and a full disk becomes one line naming the target."""
    try:
        yield
    except BaseException as exc:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
        message = full_disk_message(exc, target)
        if message is not None:
            raise InputError(message) from None
        raise


def as_umask_allows(path) -> None:
    """The mode a plain open() would give (0644 under umask 022): temporary files (and safetensors)
    are created 0600, which collaborators on a shared store could not read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def exists(url: str) -> bool:
    return size(url) is not None if is_s3(url) else Path(url).exists()


def size(url: str) -> int | None:
    """The bytes of a file or object; None when there is none."""
    if not is_s3(url):
        return Path(url).stat().st_size if Path(url).is_file() else None
    bucket, key = split_s3(url)
    try:
        return with_retries(f"head {url}", s3_client().head_object, Bucket=bucket, Key=key)["ContentLength"]
    except Exception as exc:
        if _not_found(exc):
            return None
        raise


def remove(url: str) -> None:
    """Delete a file or object; one that is not there is no error."""
    if not is_s3(url):
        Path(url).unlink(missing_ok=True)
        return
    bucket, key = split_s3(url)
    with_retries(f"delete {url}", s3_client().delete_object, Bucket=bucket, Key=key)


def upload_file(local_path: str | Path, url: str, multipart_threshold: int = MULTIPART_THRESHOLD) -> None:
    """Upload a local file to S3, in parts above `multipart_threshold` bytes (5 MiB at least)."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = split_s3(url)
    threshold = max(multipart_threshold, 5 * 1024 * 1024)
    config = TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold)
    with_retries(f"upload {url}", s3_client().upload_file, str(local_path), bucket, key, Config=config)


class S3Stream:
    """An S3 object's body; a read that fails (a dropped or silent connection) is an S3Error naming
    the object, not a damaged file."""

    def __init__(self, body, url: str):
        self.body, self.url, self.bytes = body, url, 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.body.read(None if size < 0 else size)
        except Exception as exc:  # noqa: BLE001 - botocore and urllib3 raise many kinds
            raise S3Error(f"reading {self.url}: the connection failed after {self.bytes} bytes "
                          f"({type(exc).__name__}: {without_userinfo(str(exc))})") from None
        self.bytes += len(data)
        return data

    def close(self) -> None:
        self.body.close()


def open_stream(url: str):
    """A readable binary stream of the whole object (S3 objects are streamed, not buffered)."""
    if not is_s3(url):
        return open(url, "rb")
    bucket, key = split_s3(url)
    try:
        return S3Stream(with_retries(f"get {url}", s3_client().get_object, Bucket=bucket, Key=key)["Body"], url)
    except Exception as exc:
        if _not_found(exc):
            raise FileNotFoundError(f"no such object: {url}") from None
        raise


def _webdataset_s3_opener(url, mode="rb", bufsize=8192, **kw):
    if mode[0] != "r":
        raise InputError(f"s3 URLs are read-only in the data pipeline: {url}")
    return open_stream(url)


def register_webdataset_opener() -> None:
    """Teach webdataset's gopen to stream s3:// URLs through boto3."""
    from webdataset.gopen import gopen_schemes

    gopen_schemes["s3"] = _webdataset_s3_opener
