"""An authenticating reverse proxy for tests: in front of a registry, it demands Basic
credentials or a bearer token obtained from its own token endpoint (the Docker token
flow: 401 + ``WWW-Authenticate: Bearer realm,service,scope`` → GET realm → retry)."""

from __future__ import annotations

import base64
import itertools
import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx

_REPOSITORY = re.compile(r"^/v2/(.+?)/(?:blobs|manifests|tags|referrers)/")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients closing kept-alive connections are not news


def serve_http(handle: Callable[[BaseHTTPRequestHandler], None]) -> QuietServer:
    """A threaded HTTP/1.1 server on a free loopback port; every request goes to ``handle``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            handle(self)

        do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    server = QuietServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class AuthGate:
    def __init__(self, upstream: str, mode: str, username: str, password: str, token_ttl: int = 60) -> None:
        assert mode in ("basic", "bearer")
        self.upstream = upstream.rstrip("/")
        self.mode = mode
        self.expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.token_ttl = token_ttl
        self.tokens: set[str] = set()
        self.token_requests: list[dict[str, list[str]]] = []
        self.refused = 0  # requests answered 401
        self.passed = 0  # requests let through
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=self.upstream, timeout=60)
        self.server = serve_http(self.handle)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._http.close()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path = urlsplit(request.path)
        if path.path == "/token":
            self._token(request, parse_qs(path.query))
            return
        authorization = request.headers.get("Authorization", "")
        allowed = authorization == self.expected if self.mode == "basic" else authorization[7:] in self.tokens
        if not allowed:
            self._challenge(request, path.path)
            return
        with self._lock:
            self.passed += 1
        self._forward(request)

    def _token(self, request: BaseHTTPRequestHandler, query: dict[str, list[str]]) -> None:
        with self._lock:
            self.token_requests.append(query)
        if request.headers.get("Authorization") != self.expected:
            self._send(request, 401, b'{"details":"bad credentials"}')
            return
        token = f"token-{next(self._ids)}"
        with self._lock:
            self.tokens.add(token)
        body = json.dumps({"token": token, "expires_in": self.token_ttl}).encode()
        self._send(request, 200, body, {"Content-Type": "application/json"})

    def _challenge(self, request: BaseHTTPRequestHandler, path: str) -> None:
        with self._lock:
            self.refused += 1
        self._drain_body(request)
        if self.mode == "basic":
            header = 'Basic realm="gate"'
        else:
            match = _REPOSITORY.match(path)
            scope = f',scope="repository:{match.group(1)}:pull,push"' if match else ""
            header = f'Bearer realm="{self.url}/token",service="gate"{scope}'
        body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        self._send(request, 401, body, {"WWW-Authenticate": header, "Content-Type": "application/json"})

    def _forward(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"authorization"}
        }
        response = self._http.request(request.command, request.path, content=body, headers=headers)
        out = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP | {"content-length"}}
        self._send(
            request, response.status_code, response.content, out, response.headers.get("content-length")
        )

    @staticmethod
    def _drain_body(request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        if length:
            request.rfile.read(length)

    @staticmethod
    def _send(
        request: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        length: str | None = None,
    ) -> None:
        request.send_response(status)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        head = request.command == "HEAD"
        request.send_header("Content-Length", (length or "0") if head else str(len(body)))
        request.end_headers()
        if not head:
            request.wfile.write(body)
