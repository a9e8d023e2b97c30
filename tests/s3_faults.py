"""A fault-injecting TCP proxy on 127.0.0.1 in front of a real S3 endpoint (moto's server).

Each new connection takes the next fault from a queue (then passes through once it is empty):
`silent` (reads the request, never answers), `slow` (answers, a little at a time), `500`, `503`
and `403` (answer 500 Internal Server Error, 503 Service Unavailable or 403 Forbidden and close), `continue`
(answers a status line `100 Continue` and closes before its blank line) and `drop` (forwards the request,
then cuts the connection half-way through the answer). `freeze()` stops every byte on every connection, open or
new, as a SIGSTOPped endpoint would; `thaw()` lets them flow again.
"""
from __future__ import annotations

import collections
import socket
import threading
import time

FAULTS = ("silent", "slow", "500", "503", "403", "continue", "drop")
STATUS = {"500": b"500 Internal Server Error", "503": b"503 Service Unavailable", "403": b"403 Forbidden"}
SLOW_CHUNK, SLOW_DELAY_S = 16 * 1024, 0.05


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.faults: collections.deque[str] = collections.deque()
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def inject(self, *faults: str) -> None:
        assert set(faults) <= set(FAULTS), faults
        self.faults.extend(faults)

    def freeze(self) -> None:
        self.frozen.set()

    def thaw(self) -> None:
        self.frozen.clear()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            fault = self.faults.popleft() if self.faults else "pass"
            threading.Thread(target=self._serve, args=(client, fault), daemon=True).start()

    def _serve(self, client: socket.socket, fault: str) -> None:
        with client:
            if fault in ("silent", "continue") or fault in STATUS:
                request = _read_request(client)
                if fault == "continue" and request:
                    client.sendall(b"HTTP/1.1 100 Continue\r\n")
                elif fault in STATUS and request:
                    client.sendall(b"HTTP/1.1 " + STATUS[fault] + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                else:
                    self.closed.wait()
                return
            with socket.create_connection(self.upstream) as server:
                up = threading.Thread(target=self._pump, args=(client, server, None), daemon=True)
                up.start()
                self._pump(server, client, fault)

    def _pump(self, source: socket.socket, sink: socket.socket, fault: str | None) -> None:
        """Copy bytes until either side closes; `drop` cuts the answer half-way, `slow` trickles it."""
        try:
            while not self.closed.is_set():
                data = source.recv(SLOW_CHUNK if fault == "slow" else 65536)
                if not data:
                    break
                while self.frozen.is_set() and not self.closed.is_set():
                    time.sleep(0.05)
                if fault == "drop":
                    sink.sendall(data[: len(data) // 2])
                    break
                if fault == "slow":
                    time.sleep(SLOW_DELAY_S)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _read_request(client: socket.socket) -> bytes:
    """The request's head and body (by Content-Length; none awaited after `Expect: 100-continue`)."""
    client.settimeout(5)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = client.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(b":") for line in head.split(b"\r\n")[1:])}
        length = 0 if headers.get(b"expect") == b"100-continue" else int(headers.get(b"content-length", 0))
        while len(body) < length:
            chunk = client.recv(65536)
            if not chunk:
                break
            body += chunk
    except OSError:
        pass
    return data
