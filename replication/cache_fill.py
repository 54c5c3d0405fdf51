"""A blob on its way from an upstream registry into the engine, handed to its first reader
as it arrives (the pull-through cache's tee).

The upstream body is streamed into an upload session of the engine, which hashes it and
makes the blob visible only if the bytes match the digest. The same chunks go to the
client that asked, through a small bounded queue (memory stays flat whatever the size),
with one chunk held back until the engine has verified the digest: a client never
receives the whole of a body that does not match (it sees a cut response, or an error
before the first byte for a blob that fits in two chunks).

The fetch runs in a thread of its own, so it completes and the cache is filled even
when the client goes away; a reader that stops taking chunks for a while is dropped
rather than holding the fetch. One fetch per digest in a process (``BlobFills``): a
second request for a digest being fetched waits for it, then reads the stored blob.
Across processes two fetches are possible; the engine's dedup keeps one copy.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from cargohold.engine import BlobReader, Registry
from cargohold.engine.errors import (
    BlobUnknown,
    DigestInvalid,
    RegistryError,
    SizeInvalid,
    UpstreamUnavailable,
)
from cargohold.replication.client import RemoteBlob
from cargohold.replication.copier import KeyedLocks

log = logging.getLogger(__name__)

QUEUED_CHUNKS = 8  # chunks (up to 1 MiB each) waiting for a slow reader
READER_STALL_SECONDS = 30.0  # a reader that takes nothing for this long is dropped
_END = object()


class BlobFill:
    """One blob's fetch: its upload session in the engine, its thread, and its first reader."""

    def __init__(
        self,
        registry: Registry,
        repository: str,
        digest: str,
        remote: RemoteBlob,
        on_end: Callable[[BlobFill], None] = lambda _fill: None,
    ) -> None:
        self.registry = registry
        self.repository = repository
        self.digest = digest
        self.remote = remote
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self._on_end = on_end
        self._queue: queue.Queue[object] = queue.Queue(QUEUED_CHUNKS)
        self._detached = threading.Event()
        # Started here, so that a refusal (read-only mode) is the request's answer.
        self._upload_id = registry.start_upload(repository, digest.partition(":")[0]).id

    def start(self) -> BlobReader:
        """Fetch in the background; the reader streams what arrives."""
        threading.Thread(target=self.run, name=f"cache-fill {self.digest[:19]}", daemon=True).start()
        assert self.remote.size is not None
        return BlobReader(self.digest, self.remote.size, None, self._read)

    def run(self) -> None:
        try:
            self.registry.finish_upload(
                self.repository, self._upload_id, self.digest, self._tee(), length=self.remote.size
            )
            log.info("cached %s in %s from its upstream", self.digest, self.repository)
        except BaseException as exc:
            self.error = exc
            log.warning("fetching %s for %s failed: %s", self.digest, self.repository, exc)
            with contextlib.suppress(RegistryError):  # a digest mismatch already discarded it
                self.registry.cancel_upload(self.repository, self._upload_id)
        finally:
            self.remote.close()
            self._offer(_END)
            self.finished.set()
            self._on_end(self)

    def detach(self) -> None:
        """The reader is gone: fetch on at full speed without it."""
        self._detached.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()

    def failure(self) -> RegistryError:
        """What the client is told when the fetch failed."""
        if isinstance(self.error, DigestInvalid | SizeInvalid):
            message = f"the upstream sent bytes that do not match {self.digest}; nothing was stored"
        else:
            message = f"fetching {self.digest} from the upstream failed"
        return UpstreamUnavailable(message, detail={"digest": self.digest})

    # -- the fetch's side -------------------------------------------------------------------
    def _tee(self) -> Iterator[bytes]:
        for chunk in self.remote.chunks:
            self._offer(chunk)
            yield chunk

    def _offer(self, item: object) -> None:
        deadline = time.monotonic() + READER_STALL_SECONDS
        while not self._detached.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                if time.monotonic() > deadline:
                    log.warning("the reader of %s stopped reading; fetching on without it", self.digest)
                    self.detach()

    # -- the reader's side ------------------------------------------------------------------
    def _read(self, start: int, end: int | None) -> Iterator[bytes]:
        if start == 0 and end in (None, self.remote.size):
            return self._stream()
        # A range of a blob still arriving: wait for all of it, then read from the store.
        self.detach()
        self.finished.wait()
        if self.error is not None:
            raise self.failure()
        return self.registry.open_blob(self.repository, self.digest).read(start, end)

    def _stream(self) -> Iterator[bytes]:
        """Waits for two chunks (or the end) first: a small blob that fails verification is
        then an error response, not a cut one."""
        try:
            first = self._take()
            if first is _END:
                return self._ended(())
            second = self._take()
            if second is _END:
                return self._ended((first,))
        except BaseException:
            self.detach()
            raise
        return self._rest(first, second)

    def _ended(self, chunks: tuple[object, ...]) -> Iterator[bytes]:
        if self.error is not None:
            raise self.failure()
        return iter(chunks)  # type: ignore[arg-type]

    def _rest(self, held: object, following: object) -> Iterator[bytes]:
        try:
            yield held  # type: ignore[misc]
            held = following
            while True:
                item = self._take()
                if item is _END:
                    if self.error is not None:
                        raise self.failure()
                    yield held  # type: ignore[misc]
                    return
                yield held  # type: ignore[misc]
                held = item
        finally:
            self.detach()

    def _take(self) -> object:
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                item = None
            if self._detached.is_set():  # dropped as too slow: what follows has gaps
                raise UpstreamUnavailable("the cache stopped streaming to this slow reader; pull again")
            if item is not None:
                return item


class BlobFills:
    """The fetches running in this process, one per digest."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._locks = KeyedLocks()
        self._guard = threading.Lock()
        self._running: dict[str, BlobFill] = {}

    def open(self, repository: str, digest: str, fetch: Callable[[], RemoteBlob | None]) -> BlobReader:
        """The blob from the store if it is there (or arrives while we wait), else from the
        upstream (``fetch``), stored as it streams to the reader."""
        with self._locks.hold(digest):
            with self._guard:
                running = self._running.get(digest)
            if running is not None:
                running.finished.wait()
            with contextlib.suppress(BlobUnknown):
                return self.registry.open_blob(repository, digest)
            remote = fetch()
            if remote is None:
                raise BlobUnknown(detail={"digest": digest})
            try:
                # The upstream answered 200 for this repository: linking our copy gives away nothing.
                if self.registry.mount_blob(repository, digest, None) is not None:
                    remote.close()
                    return self.registry.open_blob(repository, digest)
                fill = BlobFill(self.registry, repository, digest, remote, self._ended)
            except BaseException:
                remote.close()
                raise
            if remote.size is None:  # no length to announce: store first, then serve
                fill.detach()
                fill.run()
                if fill.error is not None:
                    raise fill.failure()
                return self.registry.open_blob(repository, digest)
            with self._guard:
                self._running[digest] = fill
            return fill.start()

    def _ended(self, fill: BlobFill) -> None:
        with self._guard:
            if self._running.get(fill.digest) is fill:
                del self._running[fill.digest]
