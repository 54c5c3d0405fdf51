"""Deleting many local files in a helper process, off the registry process's GIL.

A GC sweep alternates database work with deleting the copies it tombstoned. In threads of
the same process the two contend for the GIL (each ``unlink`` wants it back between system
calls): measured on 2 cores, 50,000 deletes overlapped with the sweep took 0.71-0.80 s in
threads and 0.50-0.54 s in another process. So the filesystem backend hands batches of paths
to this helper, a plain Python started with ``-I -S`` that imports nothing of ours, which
unlinks them with many threads and answers with the paths it could not delete. An unlink
that frees an inode and its block spends most of its time waiting in the kernel (ext4's
journal), so many at once overlap: 50,000 such unlinks took 3.1 s in one thread, 2.0 s in
four, 1.7 s in eight; a whole GC run freeing them took ~2.3 s with 4 threads, ~1.95 s with 8
and ~1.8 s with 16 or 32 (alternating runs on the 100,000-blob benchmark store, 2 cores).

The protocol is text on the helper's stdin and stdout, one message per batch, ended by an
empty line: a ticket number and how many paths a thread takes at a time, then one path per
line (keys are checked, so no path holds a newline). The answer is the ticket, then the
paths that failed. The helper exits when its stdin closes or after ``idle`` seconds without
a request; the parent starts another on demand, and deletes a batch itself if the helper is
gone (deleting twice is harmless).

While requests are writing, a GC sends each batch as one thread's share (``one_at_a_time``):
every freed inode is journal traffic that the requests' fsyncs wait behind. Small-image
pushes with a GC looping beside them went from 20% below the rate without a GC to 4% below.
"""

from __future__ import annotations

import itertools
import os
import queue
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO

THREADS = 16  # unlinks wait in the kernel (the journal) more than they run: see above
IDLE_EXIT_SECONDS = 5.0  # a GC sends a batch every few milliseconds; between runs, no helper
CHUNK = 100  # paths per thread task
END = b"\n\n"
PIPE_BYTES = 1 << 20


def unlink_each(paths: Sequence[str]) -> list[str]:
    """Unlink every path; returns the ones that failed (already gone counts as done)."""
    failed = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            failed.append(path)
    return failed


def _encode(header: str, paths: Sequence[str]) -> bytes:
    return (header + "".join("\n" + path for path in paths)).encode() + END


def _decode(message: bytes) -> tuple[str, list[str]]:
    header, *paths = message.decode().split("\n")
    return header, paths


class Unlinker:
    """The parent's side: ``start(paths)`` sends a batch and returns a call that waits for
    the answer (the failed paths). Safe to share between threads."""

    def __init__(self, threads: int = THREADS, idle_exit: float = IDLE_EXIT_SECONDS) -> None:
        self._command = [sys.executable, "-I", "-S", __file__, str(threads), str(idle_exit)]
        self._lock = threading.Lock()
        self._tickets = itertools.count(1)
        self._process: subprocess.Popen[bytes] | None = None
        self._received = b""
        self._answers: dict[int, list[str]] = {}  # read while waiting for another ticket

    def start(self, paths: Sequence[str], one_at_a_time: bool = False) -> Callable[[], list[str]]:
        """``one_at_a_time``: the batch's unlinks run in one thread, not all of the helper's
        (while requests are writing, so the unlinks' journal traffic stays a trickle)."""
        paths = list(paths)
        chunk = max(len(paths), 1) if one_at_a_time else CHUNK
        with self._lock:
            ticket = next(self._tickets)
            helper = self._send(_encode(f"{ticket} {chunk}", paths))

        def wait() -> list[str]:
            failed = self._answer(helper, ticket) if helper is not None else None
            return unlink_each(paths) if failed is None else failed

        return wait

    def close(self) -> None:
        with self._lock:
            self._discard()

    def _send(self, request: bytes) -> subprocess.Popen[bytes] | None:
        """Write to the helper (a new one if it exited meanwhile); None: do it here."""
        for _ in range(2):
            helper = self._running()
            if helper is None:
                return None
            try:
                assert helper.stdin is not None
                helper.stdin.write(request)
                helper.stdin.flush()
                return helper
            except OSError:  # exited when idle, or killed
                self._discard()
        return None

    def _answer(self, helper: subprocess.Popen[bytes], ticket: int) -> list[str] | None:
        with self._lock:
            while ticket not in self._answers:
                if helper is not self._process:
                    return None  # that helper is gone, and its answers with it
                message = self._read_message(helper)
                if message is None:
                    self._discard()
                    return None
                header, failed = _decode(message)
                self._answers[int(header)] = failed
            return self._answers.pop(ticket)

    def _read_message(self, helper: subprocess.Popen[bytes]) -> bytes | None:
        assert helper.stdout is not None
        while END not in self._received:
            data = os.read(helper.stdout.fileno(), 1 << 16)
            if not data:
                return None
            self._received += data
        message, _, self._received = self._received.partition(END)
        return message

    def _running(self) -> subprocess.Popen[bytes] | None:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._discard()
        if not sys.executable:
            return None  # an embedded interpreter: nothing to start
        try:
            self._process = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError:
            return None
        _widen(self._process.stdin)
        return self._process

    def _discard(self) -> None:
        helper, self._process = self._process, None
        self._received = b""
        self._answers.clear()
        if helper is not None:
            for stream in (helper.stdin, helper.stdout):
                if stream is not None:
                    stream.close()
            try:
                helper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()


def _widen(pipe: IO[bytes] | None) -> None:
    """A pipe that holds a few batches (Linux; 64 KiB by default, a sweep page's paths are
    ~140 KiB), so sending one rarely waits for the helper, even while it starts."""
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)  # type: ignore[union-attr]
    except (ImportError, AttributeError, OSError):  # not Linux, or over pipe-max-size
        pass


# -- the helper process -----------------------------------------------------------------------
def _requests(stdin: int, idle: float) -> Iterator[tuple[str, list[str]]]:
    """Requests from ``stdin`` until it closes or stays quiet for ``idle`` seconds."""
    received = b""
    while True:
        while END in received:
            message, _, received = received.partition(END)
            yield _decode(message)
        ready, _, _ = select.select([stdin], [], [], idle)
        data = os.read(stdin, 1 << 16) if ready else b""
        if not data:
            return
        received += data


def _write_answers(
    batches: queue.SimpleQueue[tuple[int, list[Future[list[str]]]] | None], stdout: IO[bytes]
) -> None:
    """A thread of its own that waits for each batch in turn and answers it, so the helper
    keeps reading requests (a parent never blocks on a full pipe while a batch runs)."""
    while (batch := batches.get()) is not None:
        ticket, parts = batch
        failed = [path for part in parts for path in part.result()]
        try:
            stdout.write(_encode(str(ticket), failed))
            stdout.flush()
        except OSError:  # the parent is gone: nobody is waiting for answers
            return


def main(argv: Sequence[str]) -> None:
    threads = int(argv[0]) if argv else THREADS
    idle = float(argv[1]) if len(argv) > 1 else IDLE_EXIT_SECONDS
    batches: queue.SimpleQueue[tuple[int, list[Future[list[str]]]] | None] = queue.SimpleQueue()
    writer = threading.Thread(target=_write_answers, args=(batches, sys.stdout.buffer))
    writer.start()
    try:
        with ThreadPoolExecutor(threads) as pool:
            for header, paths in _requests(sys.stdin.fileno(), idle):
                ticket, chunk = (int(field) for field in header.split())
                parts = [pool.submit(unlink_each, paths[i : i + chunk]) for i in range(0, len(paths), chunk)]
                batches.put((ticket, parts))
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        batches.put(None)
        writer.join()


if __name__ == "__main__":
    main(sys.argv[1:])
