"""One structured log line per request: method, path, status, bytes in and out, duration."""

from __future__ import annotations

import json
import logging
import os
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("cargohold.access")


class AccessLog:
    def __init__(self, app: ASGIApp, fmt: str = "json") -> None:
        self.app = app
        self.fmt = fmt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not log.isEnabledFor(logging.INFO):
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
            record = {
                "method": scope["method"],
                "path": scope["path"],
                "status": status or 500,
                "bytes_in": received,
                "bytes_out": sent,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                "client": (scope.get("client") or ("-",))[0],
                "pid": os.getpid(),
            }
            if self.fmt == "json":
                log.info(json.dumps(record, separators=(",", ":")))
            else:
                log.info(" ".join(f"{k}={v}" for k, v in record.items()))
