"""Request bodies as a bounded stream of large pieces, consumed by the engine in a worker thread.

The engine is synchronous. A request body arrives on the event loop in small frames;
handing each frame to a thread would cost a hop per 64 KiB, so a prefetch task
coalesces frames into pieces of ``PIECE`` bytes and queues at most ``DEPTH`` of them:
the network, the hashing and the disk write overlap, and memory stays bounded
(about ``PIECE * (DEPTH + 2)`` per request) whatever the blob size.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio.from_thread
from starlette.requests import Request

PIECE = 1024 * 1024
DEPTH = 4
_END = object()


async def coalesce(stream: AsyncIterator[bytes], piece: int = PIECE) -> AsyncIterator[bytes]:
    buffer = bytearray()
    async for frame in stream:
        if not frame:
            continue
        if not buffer and len(frame) >= piece:
            yield frame
            continue
        buffer += frame
        if len(buffer) >= piece:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The whole body if it is at most ``limit`` bytes, else None (small bodies only)."""
    buffer = bytearray()
    async for frame in request.stream():
        buffer += frame
        if len(buffer) > limit:
            return None
    return bytes(buffer)


class BodyPump:
    """Feeds a request body to a worker thread as a plain iterator of pieces."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._queue: asyncio.Queue[Any] = asyncio.Queue(DEPTH)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BodyPump:
        self._task = asyncio.get_running_loop().create_task(self._fill())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _fill(self) -> None:
        try:
            async for piece in coalesce(self._request.stream()):
                await self._queue.put(piece)
        except Exception as exc:
            await self._queue.put(exc)
            return
        await self._queue.put(_END)

    def pieces(self) -> Iterator[bytes]:
        """Call from the worker thread only."""
        while True:
            item = anyio.from_thread.run(self._queue.get)
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
