"""Per request: one structured access line (method, path, status, bytes in and out, duration,
client, worker pid) and the request metrics, from one measurement.

Access lines are the hottest log of a registry (tens of thousands a second on manifest
and blob HEADs), so they bypass the logging module's per-record machinery: each line is
formatted once and appended to a buffer that goes to stderr in one write every 256
lines or every second (and at shutdown). A crash loses at most a second of access lines,
never anything else. Other logs go through ``logging`` as usual.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cargohold.metrics import observe_request

log = logging.getLogger("cargohold.access")
FLUSH_LINES = 256
FLUSH_SECONDS = 1.0


class AccessLineBuffer:
    """Access lines waiting to be written to a file descriptor in one go."""

    def __init__(self, fd: int = 2) -> None:
        self.fd = fd
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._flushed_at = time.monotonic()

    def add(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)
            due = len(self._lines) >= FLUSH_LINES or time.monotonic() - self._flushed_at > FLUSH_SECONDS
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
            self._flushed_at = time.monotonic()
        if lines:
            data = ("\n".join(lines) + "\n").encode()
            while data:
                data = data[os.write(self.fd, data) :]


class AccessLog:
    def __init__(self, app: ASGIApp, fmt: str = "json", buffer: AccessLineBuffer | None = None) -> None:
        self.app = app
        self.fmt = fmt
        self.buffer = buffer or AccessLineBuffer()
        self.pid = os.getpid()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        sent = 0
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            seconds = time.perf_counter() - started
            observe_request(scope["method"], scope["path"], status or 500, received, sent, seconds)
            if log.isEnabledFor(logging.INFO):
                self.buffer.add(self._line(scope, status or 500, received, sent, seconds))

    def _line(self, scope: Scope, status: int, received: int, sent: int, seconds: float) -> str:
        client = (scope.get("client") or ("-",))[0]
        if self.fmt == "json":
            path = json.dumps(scope["path"])  # the only field a client controls: escape it
            return (
                f'{{"method":"{scope["method"]}","path":{path},"status":{status},"bytes_in":{received},'
                f'"bytes_out":{sent},"duration_ms":{seconds * 1000:.3f},"client":"{client}",'
                f'"pid":{self.pid}}}'
            )
        path = json.dumps(scope["path"])
        return (
            f"method={scope['method']} path={path} status={status} bytes_in={received} bytes_out={sent} "
            f"duration_ms={seconds * 1000:.3f} client={client} pid={self.pid}"
        )
