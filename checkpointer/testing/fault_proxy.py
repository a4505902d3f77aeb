"""A reverse HTTP proxy on loopback that injects faults into another test server's answers.

moto's S3 server has no fault injection; put this in front of it and queue faults
(``inject_fault``: a status, a reset, a delay, a cut body) for requests matching a method
and a path pattern. Everything else is forwarded unchanged.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from checkpointer.testing.faults import FaultQueue

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        proxy = self.server.proxy
        fault = proxy.faults.take(self.command, self.path)
        if fault and fault.delay:
            time.sleep(fault.delay)
        if fault and fault.reset:
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        body = self._read_body()
        if fault and fault.status:
            self._answer(fault.status, {"Content-Type": "application/xml"}, b"<Error><Code>InjectedFault</Code></Error>")
            return
        status, headers, payload = proxy.forward(self.command, self.path, self.headers.items(), body)
        self._answer(status, headers, payload, truncate=bool(fault and fault.truncate))

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, status: int, headers: dict[str, str], payload: bytes, truncate: bool = False) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        upstream_length = next((v for k, v in headers.items() if k.lower() == "content-length"), None)
        self.send_header("Content-Length", upstream_length if self.command == "HEAD" and upstream_length else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload[: len(payload) // 2] if truncate else payload)
        if truncate:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no per-request logging
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy


class FaultProxy:
    """Forwards to ``upstream`` (``http://host:port``), injecting the faults queued in ``faults``."""

    def __init__(self, upstream: str):
        split = urlsplit(upstream)
        self.upstream_host, self.upstream_port = split.hostname, split.port
        self.faults = FaultQueue()
        self._server: _Server | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> FaultProxy:
        self._server = _Server((host, port), _Handler)
        self._server.proxy = self
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def inject_fault(self, method: str, path_regex: str, **fault: Any) -> None:
        """Queue a fault (see :meth:`FaultQueue.inject`)."""
        self.faults.inject(method, path_regex, **fault)

    def forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """One request to the upstream server; its status, headers and body."""
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            forwarded = {k: v for k, v in headers if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"}
            connection.request(method, path, body=body if body or method in ("PUT", "POST") else None, headers=forwarded)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
