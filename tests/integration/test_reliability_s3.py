"""S3 requests are bounded: connect and read timeouts, one retry policy (ours, each retry
printed), a bounded number of attempts and time, and an S3Error naming the object when giving
up; a connection that breaks mid-stream is an S3 error, not a damaged shard. The endpoint is moto's
server on 127.0.0.1 behind a fault-injecting proxy (tests/s3_faults.py): silent, slow, 503 and
dropped connections, or frozen altogether as a SIGSTOPped endpoint."""
from __future__ import annotations

import os
import sys
import time
from urllib.parse import urlparse

import pytest
from s3_faults import FaultProxy

from medsapiens.io import storage

BUCKET = "s3://medsapiens-test"
LIMITS = {"MEDSAPIENS_S3_CONNECT_TIMEOUT_S": "1", "MEDSAPIENS_S3_READ_TIMEOUT_S": "1",
          "MEDSAPIENS_S3_ATTEMPTS": "4", "MEDSAPIENS_S3_GIVE_UP_AFTER_S": "20"}


@pytest.fixture
def proxy(s3_env, monkeypatch):
    """boto3 (here and in the build's worker processes) reaches moto only through the proxy, with short limits."""
    env, _ = s3_env
    endpoint = urlparse(env["AWS_ENDPOINT_URL"])
    faulty = FaultProxy((endpoint.hostname, endpoint.port))
    for name, value in {**env, **LIMITS, "AWS_ENDPOINT_URL": faulty.url}.items():
        monkeypatch.setenv(name, value)
    storage._client_for_pid.cache_clear()
    yield faulty
    faulty.close()
    storage._client_for_pid.cache_clear()


@pytest.fixture(scope="module")
def head_phantoms(tmp_path_factory):
    from medsapiens.shards.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("raw"), n=6, seed=0, sets=["head"])["head"]


def build_to(out: str, raw) -> None:
    from medsapiens.shards.build import BuildOptions, build
    from medsapiens.shards.plan import SourceSpec

    build([SourceSpec("head", str(raw))], BuildOptions(out=out, max_side=64, shard_size=3, workers=1, progress=False))


def shard_digests(location: str) -> dict[str, str]:
    from medsapiens.io.manifest import load

    return {shard.url: shard.sha256 for shard in load(location).shards}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", ["silent", "500", "503"])
def test_a_failing_endpoint_gives_up_in_bounded_time_naming_the_object(proxy, fault, capsys):
    proxy.inject(*[fault] * 10)
    started = time.monotonic()
    with pytest.raises(storage.S3Error, match=rf"get {BUCKET}/shards/a\.tar: gave up after 4 attempt\(s\)"):
        storage.read_bytes(f"{BUCKET}/shards/a.tar")
    assert time.monotonic() - started < 20  # 4 attempts x 1 s read timeout + backoff, not 4 x 60 s x botocore's retries
    assert capsys.readouterr().err.count(f"warning: get {BUCKET}/shards/a.tar failed") == 3  # each retry printed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [1000, 6 << 20])  # one request; two parts
@pytest.mark.parametrize("fault", ["503", "continue"])  # botocore read a 100 Continue cut short forever, at full CPU
def test_an_upload_answered_503_or_cut_short_is_retried(proxy, tmp_path, size, fault, capsys):
    local = tmp_path / "shard.tar"
    local.write_bytes(os.urandom(size))
    proxy.inject(fault)
    storage.upload_file(local, f"{BUCKET}/up/shard.tar", multipart_threshold=5 << 20)
    assert not proxy.faults and storage.read_bytes(f"{BUCKET}/up/shard.tar") == local.read_bytes()
    assert f"warning: upload {BUCKET}/up/shard.tar failed" in capsys.readouterr().err


@pytest.mark.parametrize("setting, expected", [
    ({"AWS_PROFILE": "nowhere"}, "The config profile (nowhere) could not be found: set AWS_PROFILE"),
    ({"AWS_ENDPOINT_URL": "127.0.0.1:9000"}, "Invalid endpoint: 127.0.0.1:9000: the endpoint (AWS_ENDPOINT_URL"),
    ({"AWS_DEFAULT_REGION": "us east 1"}, "S3: Provided region_name 'us east 1' doesn't match"),
    ({"AWS_CONFIG_FILE": "{config}"}, "S3: Unable to parse config file"),
])
def test_an_s3_setting_that_cannot_work_is_one_line(tmp_path, monkeypatch, capsys, setting, expected):
    import boto3
    from conftest import refused_here

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # a session reads its config once, when it is made
    monkeypatch.setenv("HOME", str(tmp_path))  # no AWS config of the machine's
    (tmp_path / "config").write_text("[default\nregion = x\n")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    for name, value in setting.items():
        monkeypatch.setenv(name, value.format(config=tmp_path / "config"))
    storage._client_for_pid.cache_clear()
    try:
        refused_here(capsys, ["shards", "verify", f"{BUCKET}/shards"], expected)
    finally:
        storage._client_for_pid.cache_clear()


@pytest.mark.timeout(120)
def test_a_missing_bucket_or_denied_access_is_one_line(proxy, head_phantoms, tmp_path):
    from conftest import REPO, run

    local = tmp_path / "shard.tar"
    local.write_bytes(b"x" * 1000)
    with pytest.raises(storage.S3Error, match=r"upload s3://no-such-bucket/a\.tar: NoSuchBucket \(HTTP 404\)"):
        storage.upload_file(local, "s3://no-such-bucket/a.tar")
    for command in (["build", "--source", f"head={head_phantoms}", "--max-side", "64", "--no-progress", "--out"],
                    ["verify"]):
        proc = run([sys.executable, "-m", "medsapiens.launch.cli", "shards", *command, "s3://no-such-bucket/p"], 110,
                   env={"PYTHONPATH": str(REPO)})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "s3://no-such-bucket/p" in last, last
    proxy.inject(*["403"] * 3)
    with pytest.raises(storage.S3Error, match=rf"get {BUCKET}/a\.tar: 403 \(HTTP 403\)"):
        storage.read_bytes(f"{BUCKET}/a.tar")


@pytest.mark.timeout(120)
def test_a_body_cut_short_is_retried_and_a_prefix_may_hold_hash_and_question_marks(proxy, s3_env, head_phantoms,
                                                                                    capsys):
    """A manifest's or stats file's body cut mid-read was a traceback, not a retry; and `s3://b/exp#1` was read as
    the key `exp` with a URL fragment, so every shard, stats file and the manifest overwrote that one object."""
    body = os.urandom(200_000)
    storage.write_bytes(f"{BUCKET}/cut/manifest.json", body)
    for limit in (None, 1 << 20):  # what every reader passes: a read of at most so much stopped short silently
        proxy.inject("drop")
        assert storage.read_bytes(f"{BUCKET}/cut/manifest.json", limit) == body and not proxy.faults
        assert f"warning: get {BUCKET}/cut/manifest.json failed" in capsys.readouterr().err
    build_to(f"{BUCKET}/exp#1?v=2", head_phantoms)
    keys = [item["Key"] for item in s3_env[1].list_objects_v2(Bucket=BUCKET[5:], Prefix="exp")["Contents"]]
    assert "exp#1?v=2/manifest.json" in keys and all(key.startswith("exp#1?v=2/") for key in keys), keys
    assert len(shard_digests(f"{BUCKET}/exp#1?v=2")) == 4


@pytest.mark.timeout(60)
def test_a_read_of_at_most_so_many_bytes_whose_body_ends_early_is_retried(monkeypatch, capsys):
    """An endpoint that sends half the body it announced, then closes cleanly: a read with a limit (every reader
    passes one) returned the half as the whole object, where botocore checks only a read to the end."""
    import socket
    import threading

    body, requests = os.urandom(200_000), []
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            requests.append(request)
            sent = body[:len(body) // 2] if len(requests) == 1 else body
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + sent)
            connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    threading.Thread(target=serve, daemon=True).start()
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.getsockname()[1]}", "AWS_ACCESS_KEY_ID": "id",
                        "AWS_SECRET_ACCESS_KEY": "secret", "AWS_DEFAULT_REGION": "us-east-1", **LIMITS}.items():
        monkeypatch.setenv(name, value)
    storage._client_for_pid.cache_clear()
    try:
        assert storage.read_bytes(f"{BUCKET}/manifest.json", 1 << 20) == body and len(requests) == 2
    finally:
        storage._client_for_pid.cache_clear()
        server.close()
    assert "(IncompleteReadError), retry 1 of 3" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_an_endpoint_url_s_credentials_are_never_printed(proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://proxyuser:proxyPASSWORD@127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MEDSAPIENS_S3_ATTEMPTS", "2")
    storage._client_for_pid.cache_clear()
    with pytest.raises(storage.S3Error, match=r"gave up after 2 attempt") as refused:
        storage.read_bytes(f"{BUCKET}/a.json")
    assert "proxyPASSWORD" not in str(refused.value) and "//***@127.0.0.1:9" in str(refused.value), refused.value


@pytest.mark.timeout(120)
def test_a_build_through_5xx_drops_silence_and_slowness_ends_identical(proxy, head_phantoms, capsys):
    build_to(f"{BUCKET}/direct", head_phantoms)  # the proxy passes everything through
    proxy.inject("503", "drop", "silent", "slow", "500", "drop")
    build_to(f"{BUCKET}/faulty", head_phantoms)
    assert not proxy.faults  # every fault was met
    assert "retry 1 of 3" in capsys.readouterr().err
    direct, faulty = shard_digests(f"{BUCKET}/direct"), shard_digests(f"{BUCKET}/faulty")
    assert len(direct) == 4 and direct == faulty  # URLs relative to the manifest


@pytest.mark.timeout(120)
def test_a_build_against_a_frozen_endpoint_stops_in_bounded_time_naming_the_object(proxy, head_phantoms):
    from conftest import REPO, run

    proxy.freeze()
    started = time.monotonic()
    proc = run([sys.executable, "-m", "medsapiens.launch.cli", "shards", "build", "--source", f"head={head_phantoms}",
                "--out", f"{BUCKET}/frozen", "--max-side", "64", "--workers", "1", "--no-progress"], 110,
               env={"PYTHONPATH": str(REPO)})
    assert proc.returncode != 0 and time.monotonic() - started < 90
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{BUCKET}/frozen/" in last and "gave up after" in last, last


@pytest.mark.timeout(120)
def test_a_training_stream_from_an_endpoint_that_freezes_ends_with_an_s3_error(proxy, head_phantoms, monkeypatch,
                                                                              capsys):
    from medsapiens.data.pipeline import DataConfig, TrainStream
    from medsapiens.io.manifest import load

    build_to(f"{BUCKET}/stream", head_phantoms)
    cfg = DataConfig(shards=f"{BUCKET}/stream", datasets=["head"], micro_batch=2, workers=0, shuffle_buffer=2)
    batches = iter(TrainStream(load(cfg.shards), cfg, ["head"], (64, 48), seed=0, rank=0))
    assert next(batches)["images"].shape[0] == 2
    monkeypatch.setenv("MEDSAPIENS_S3_ATTEMPTS", "2")  # per request, and shards drawn in a row that fail
    proxy.freeze()
    started = time.monotonic()
    with pytest.raises(storage.S3Error, match=rf"{BUCKET}/stream/head-train-"):
        for _ in range(1000):
            next(batches)
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert "drawing another shard" in err and "corrupt" not in err


@pytest.mark.timeout(30)
def test_a_killed_s3_builds_staging_dirs_are_removed_by_the_next_build(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from medsapiens.shards.writer import STAGING_PREFIX, remove_stale_staging

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"{STAGING_PREFIX}{gone.pid}-abc"
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "head-train-000000.tar").write_bytes(b"x" * 100)
    remove_stale_staging()
    assert not stale.exists() and live.exists()
