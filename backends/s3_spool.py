"""Bytes on their way to S3: a bounded spool per part, and one part in flight at most.

A writer's memory stays flat whatever the blob size: a ``Spool`` keeps its first MiB in
memory and the rest in a temporary file (``TMPDIR``), holds at most one part, and a
``PartSender`` uploads the previous part in a background thread while the next one fills,
so that receiving from the client and sending to S3 overlap. At most two parts per
writer are spooled at any time.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO

MiB = 1024 * 1024
SPOOL_IN_MEMORY = 1 * MiB


class Spool:
    """Bytes on their way to becoming one part or object: the first MiB in memory, then a file."""

    def __init__(self) -> None:
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
        self.size = 0

    def append(self, data: memoryview, limit: int) -> memoryview:
        """Take as much of ``data`` as fits under ``limit`` bytes; return the rest."""
        head = data[: max(0, limit - self.size)]
        self._file.seek(self.size)
        self._file.write(head)
        self.size += len(head)
        return data[len(head) :]

    def load(self, chunks: Iterable[bytes]) -> None:
        self._file.seek(self.size)
        for chunk in chunks:
            self._file.write(chunk)
            self.size += len(chunk)

    def body(self) -> IO[bytes]:
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        self._file.close()


def fill(spool: Spool, chunks: Iterable[bytes], limit: int, cut: Callable[[], Spool]) -> int:
    """Spool ``chunks``; when the spool is full and more follows, ``cut`` takes it and gives an
    empty one. Returns the number of bytes."""
    total = 0
    for chunk in chunks:
        rest = memoryview(chunk)
        total += len(rest)
        while rest:
            if spool.size >= limit:
                spool = cut()
            rest = spool.append(rest, limit)
    return total


class PartSender:
    """Sends one part in the background while the next one fills, so that receiving from the
    client and sending to S3 overlap. One part in flight at most: a writer spools at most
    two parts (their first MiB in memory, the rest in temporary files)."""

    def __init__(self, send: Callable[[int, IO[bytes]], str]) -> None:
        self._send = send
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Spool, Future[str]] | None = None

    @property
    def pending_size(self) -> int:
        return self._pending[1].size if self._pending else 0

    def send(self, number: int, spool: Spool) -> list[tuple[int, str, int]]:
        """Start sending ``spool`` (closed once sent) as part ``number``; returns the parts done before."""
        try:
            done = self.wait()
        except BaseException:
            spool.close()
            raise
        self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="s3-part")
        self._pending = (number, spool, self._pool.submit(self._send, number, spool.body()))
        return done

    def wait(self) -> list[tuple[int, str, int]]:
        """The part in flight once it is stored, as [(number, etag, size)]; or its error."""
        if self._pending is None:
            return []
        (number, spool, future), self._pending = self._pending, None
        try:
            return [(number, future.result(), spool.size)]
        finally:
            spool.close()

    def close(self) -> None:
        """Let the part in flight finish (its outcome no longer matters) and stop the thread."""
        with contextlib.suppress(Exception):
            self.wait()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
