"""Request bodies as a bounded stream of large pieces, consumed by the engine in a worker thread.

The engine is synchronous. A request body arrives on the event loop in small frames;
handing each frame to a thread would cost a hop per 64 KiB, so a prefetch task
coalesces frames into pieces of ``PIECE`` bytes and queues at most ``DEPTH`` of them:
the network, the hashing and the disk write overlap, and memory stays bounded
(about ``PIECE * (DEPTH + 2)`` per request) whatever the blob size.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio.from_thread
from starlette.requests import Request

PIECE = 1024 * 1024
DEPTH = 4
BODY_COMPLETE = "cargohold.body_complete"  # in the scope: the request body has been received whole
BODY_GIVEN_UP = "cargohold.body_given_up"  # ...or draining it took too long
DRAIN_LIMIT = 256 * 1024 * 1024  # what an error answered mid-body reads and drops, at most...
DRAIN_SECONDS = 30.0  # ...and for how long
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
        self._discard = False

    async def __aenter__(self) -> BodyPump:
        self._task = asyncio.get_running_loop().create_task(self._fill())
        return self

    async def __aexit__(self, *exc: object) -> None:
        """The engine stopped reading (an error mid-body, most likely): read the rest and drop
        it, within the drain bounds, so the client finishes writing and reads the answer. Not
        a cancel: a receive cancelled in flight can lose its message, and the next read of
        the body would then wait for bytes that already came."""
        if self._task is None or self._task.done():
            return
        self._discard = True
        while not self._queue.empty():  # unblock a put waiting for room
            self._queue.get_nowait()
        try:
            await asyncio.wait_for(self._task, DRAIN_SECONDS)
        except TimeoutError:
            self._request.scope[BODY_GIVEN_UP] = True  # the connection closes instead
        except (asyncio.CancelledError, Exception):
            pass

    async def _fill(self) -> None:
        dropped = 0
        try:
            async for piece in coalesce(self._request.stream()):
                if self._discard:
                    dropped += len(piece)
                    if dropped > DRAIN_LIMIT:
                        return
                    continue
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


class BodyTracker:
    """Notes in the scope when a request's body has been received whole, so that an error
    answered mid-body can read the rest first (``drain``)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        scope[BODY_COMPLETE] = False

        async def tracked() -> Any:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                scope[BODY_COMPLETE] = True
            return message

        await self.app(scope, tracked, send)


async def drain(request: Request, limit: int = DRAIN_LIMIT, seconds: float = DRAIN_SECONDS) -> bool:
    """Read and drop what is left of the request body, up to ``limit`` bytes within ``seconds``;
    True if it all arrived. An error refused mid-body (a quota, a bad chunk) is then read by
    the client: one still writing its body when the server answers and closes gets a broken
    pipe instead of the answer."""
    if request.scope.get(BODY_COMPLETE, True):
        return True
    if request.scope.get(BODY_GIVEN_UP):
        return False
    received = 0
    try:
        async with asyncio.timeout(seconds):
            while not request.scope.get(BODY_COMPLETE, True) and received <= limit:
                message = await request.receive()
                received += len(message.get("body", b""))
    except TimeoutError:
        return False
    return bool(request.scope.get(BODY_COMPLETE, True))
