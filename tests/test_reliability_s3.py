"""S3 requests are bounded: connect and read timeouts, one retry policy (ours, each retry
printed), a bounded number of attempts and time, and an S3Error naming the object when giving
up; a connection that breaks mid-stream is an S3 error, not a damaged shard. Endpoints are small
fault-injecting HTTP servers on 127.0.0.1: silent, 503 on every request, a body cut short."""
from __future__ import annotations

import http.server
import os
import socket
import threading
import time

import pytest

from medsapiens import storage


@pytest.fixture
def endpoint(monkeypatch):
    """Point boto3 at a loopback server with short limits; yields a function that starts one."""
    monkeypatch.setattr(storage, "CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "READ_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "RETRIES", 3)
    monkeypatch.setattr(storage, "GIVE_UP_AFTER_S", 20.0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage._client_for_pid.cache_clear()
    servers = []

    def start(server) -> None:
        servers.append(server)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        threading.Thread(target=server.serve_forever, daemon=True).start()

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    storage._client_for_pid.cache_clear()


class Silent(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(5)  # longer than the read timeout: never answers in time

    do_HEAD = do_PUT = do_GET

    def log_message(self, *args):
        pass


class Unavailable(Silent):
    def do_GET(self):
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_PUT = do_GET


class CutShort(Silent):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"x" * 1000)
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)


def server(handler):
    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("handler", [Silent, Unavailable], ids=["silent", "503"])
def test_a_failing_endpoint_gives_up_in_bounded_time_naming_the_object(endpoint, handler, capsys):
    endpoint(server(handler))
    started = time.monotonic()
    with pytest.raises(storage.S3Error, match=r"get s3://bucket/shards/a\.tar: gave up after 3 attempt\(s\)"):
        storage.read_bytes("s3://bucket/shards/a.tar")
    assert time.monotonic() - started < 15  # 3 attempts x 1 s read timeout + backoff, not 3 x 60 s x botocore's retries
    assert capsys.readouterr().err.count("warning: get s3://bucket/shards/a.tar failed") == 2  # each retry printed


@pytest.mark.timeout(60)
def test_a_connection_cut_mid_stream_is_an_s3_error(endpoint):
    endpoint(server(CutShort))
    stream = storage.open_stream("s3://bucket/shards/a.tar")
    with pytest.raises(storage.S3Error, match=r"reading s3://bucket/shards/a\.tar: the connection failed after"):
        while stream.read(4096):
            pass


@pytest.mark.timeout(30)
def test_a_killed_s3_builds_staging_dirs_are_removed_by_the_next_build(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from shards.writer import STAGING_PREFIX, remove_stale_staging

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
