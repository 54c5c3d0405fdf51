"""Reading a file once, sequentially, in the background, so that a job about to touch most of
its pages finds them in the page cache.

A GC sweep reads most pages of the blob tables in digest order, which is not their order in
the file: with a cold page cache (a daily run on a big store) every page is a separate random
read. Measured on the 100,000-blob benchmark store (a 130 MB metadata file): the sweep took
1.2 s cold and 0.44 s warm, and reading the whole file sequentially first took 0.06 s, after
which the cold sweep took 0.54-0.61 s. ``posix_fadvise(WILLNEED)`` did not load the file here,
so the bytes are read into a reused buffer (the system call releases the GIL). A file larger
than a quarter of the RAM is left alone: it would push out more than it saves. A file already
in the page cache is left alone too (a few sample pages read with ``RWF_NOWAIT`` tell), since
copying it through the cache cost a warm GC ~0.05 s of a core for nothing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

CHUNK = 1 << 20


def ram_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _cached(fd: int, size: int, samples: int = 32) -> bool:
    """Whether pages spread over the file (``size`` bytes) are all in the page cache already
    (Linux; elsewhere the answer is no, and the file is read)."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None:
        return False
    page = bytearray(4096)
    try:
        for sample in range(samples):
            if os.preadv(fd, [page], size * sample // samples, nowait) <= 0 and size:
                return False
    except OSError:  # BlockingIOError: not cached; or the flag is not supported here
        return False
    return True


class ReadAhead:
    """``ReadAhead.start(path)`` reads ``path`` in a daemon thread; None if it is too big
    (over ``limit`` bytes, by default a quarter of the RAM), already in the page cache, or
    cannot be opened."""

    def __init__(self, fd: int) -> None:
        self.bytes_read = 0
        self._fd = fd
        self._thread = threading.Thread(target=self._read, name="cargohold-readahead", daemon=True)

    @classmethod
    def start(cls, path: Path, limit: int | None = None) -> ReadAhead | None:
        limit = ram_bytes() // 4 if limit is None else limit
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
        except OSError:
            size = limit + 1
        if size > limit or _cached(fd, size):
            os.close(fd)
            return None
        reader = cls(fd)
        reader._thread.start()
        return reader

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _read(self) -> None:
        buffer = bytearray(CHUNK)
        try:
            while (count := os.preadv(self._fd, [buffer], self.bytes_read)) > 0:
                self.bytes_read += count
        except OSError:
            pass  # only a hint: the job reads what it needs itself
        finally:
            os.close(self._fd)
