"""Small real HTTP servers on loopback for tests: a listener that records requests, and S3
endpoints that misbehave the way a sick server or network does.

- ``Listener``: answers 200 to anything and records (method, path) — proof that a worker
  did, or did not, send a request.
- ``StallingS3``: an S3 endpoint that speaks plain HTTP/1.1 on its own socket loop.
  ``mode="silent"``: accepts the connection, reads the request, never answers.
  ``mode="drip"``: answers HEAD and GET with a ``Content-Length`` of ``size`` bytes and then
  sends the body one byte every ``interval`` seconds, so no single socket read ever waits
  long enough for a read timeout.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class Listener:
    def __init__(self):
        seen = self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def _record(self):
                seen.append((self.command, self.path))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_HEAD = _record

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class StallingS3:
    def __init__(self, mode: str, *, size: int = 4096, interval: float = 0.5):
        assert mode in ("silent", "drip")
        self.mode, self.size, self.interval = mode, size, interval
        self.requests: list[str] = []
        self.closing = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while not self.closing.is_set():
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                method = head.split(b" ", 1)[0].decode()
                self.requests.append(method)
                if self.mode == "silent":
                    self.closing.wait()
                    return
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {self.size}\r\nContent-Type: audio/wav\r\n"
                             f"ETag: \"drip\"\r\n\r\n".encode())
                if method == "GET":
                    for _ in range(self.size):
                        if self.closing.wait(self.interval):
                            return
                        conn.sendall(b"x")
        except OSError:
            return

    def close(self) -> None:
        self.closing.set()
        self.listener.close()
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def stalling_s3():
    """Factory: ``stalling_s3("silent")`` or ``stalling_s3("drip", size=..., interval=...)``."""
    servers: list[StallingS3] = []

    def make(mode: str, **options) -> StallingS3:
        servers.append(StallingS3(mode, **options))
        return servers[-1]

    yield make
    for server in servers:
        server.close()
