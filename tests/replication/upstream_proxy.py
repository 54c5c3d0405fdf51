"""An HTTP reverse proxy in front of an upstream registry, for the pull-through cache tests.

It records every request that reaches the upstream (method and path), so a test can tell
a pull served locally from one that went upstream, and it can misbehave on demand:
``down`` answers every request by closing the connection (a dead upstream), and
``corrupt`` flips one byte in the body of the named blobs as they stream by.
Bodies are streamed in both directions, never held whole.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler

import httpx

from tests.replication.gate import HOP_BY_HOP, serve_http


class RecordingProxy:
    def __init__(self, upstream: str) -> None:
        self.requests: list[tuple[str, str]] = []
        self.down = False
        self.corrupt: set[str] = set()  # blob digests whose bytes are damaged on the way
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=upstream.rstrip("/"), timeout=60)
        self._server = serve_http(self._handle)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def take(self) -> list[tuple[str, str]]:
        """The requests recorded since the last call."""
        with self._lock:
            taken, self.requests = self.requests, []
        return taken

    def close(self) -> None:
        self.down = True  # kept-alive connections are cut at their next request too
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        if self.down:
            request.close_connection = True
            request.connection.close()
            return
        with self._lock:
            self.requests.append((request.command, request.path))
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = self._http.build_request(request.command, request.path, content=body, headers=headers)
        response = self._http.send(upstream, stream=True)
        try:
            self._relay(request, response)
        finally:
            response.close()

    def _relay(self, request: BaseHTTPRequestHandler, response: httpx.Response) -> None:
        damaged = any(request.path.endswith(f"/blobs/{digest}") for digest in self.corrupt)
        length = response.headers.get("content-length")
        chunks = response.iter_raw(1 << 16)
        if length is None:  # small answers only (errors, listings)
            data = response.read()
            length, chunks = str(len(data)), iter([data])
        request.send_response(response.status_code)
        for key, value in response.headers.items():
            if key.lower() not in HOP_BY_HOP | {"content-length"}:
                request.send_header(key, value)
        request.send_header("Content-Length", length)
        request.end_headers()
        if request.command == "HEAD":
            return
        for index, chunk in enumerate(chunks):
            if damaged and index == 0:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            request.wfile.write(chunk)
