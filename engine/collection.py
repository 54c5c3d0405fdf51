"""The engine's half of garbage collection: the steps that must keep the invariants.

The collector in ``cargohold.gc`` decides *when* and reports; these steps decide *what*
may go, each in one transaction:

``mark(cutoff)``
    Live blobs that no manifest references and that nothing touched (upload, mount,
    HEAD, manifest reference) since ``cutoff``. Read-only, for dry runs: a candidate is
    only a guess.
``sweep(cutoff, after)``
    Tombstones the next page of blobs that are unreferenced and idle, chosen inside a
    write transaction. A manifest PUT checks its blobs are live in its own write
    transaction, and SQLite serialises the two: either the sweep wins (the PUT answers
    MANIFEST_BLOB_UNKNOWN and the client uploads again) or the PUT wins (the blob is
    referenced and the sweep skips it). A tombstoned blob answers 404 from then on.
``purge()``
    Deletes the queued physical copies (a sweep queues each page's as one row), then
    forgets them. Runs after the tombstones committed, so a crash in between only leaves
    work for the next run (the queue is durable): a run can be stopped and resumed at any
    point. A digest re-uploaded meanwhile lives in a new copy with a new key, which the
    purge never touches.
``leaks(cutoff)``
    Objects in the backend that no row names (a crash between writing an object and
    recording it), older than ``cutoff``; found by listing the backend.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from cargohold.backends.base import Backend, DeletesInBackground, ListsNames, ObjectInfo, ObjectNotFound
from cargohold.engine.layout import BLOB_PREFIX
from cargohold.engine.metadata import MetadataStore
from cargohold.engine.metadata_jobs import CollectibleBlob, JobQueries, QueuedCopies, Settled

T = TypeVar("T")
BATCH = 2000  # blobs per transaction: fewer commits (each an fsync) without holding the lock long
READ_AHEAD_CANDIDATES = 10_000  # from here on a sweep rewrites most pages of the blob tables


@dataclass
class PurgeResult:
    deleted: int = 0
    bytes: int = 0
    failed: list[str] = field(default_factory=list)
    settled: list[Settled] = field(default_factory=list)  # for the queue to forget


def _missing(listing: Iterable[T], named: Iterator[str], key_of: Callable[[T], str]) -> Iterator[T]:
    """Items of ``listing`` whose key is not in ``named``, both ascending (a merge walk)."""
    current = next(named, None)
    for item in listing:
        key = key_of(item)
        while current is not None and current < key:
            current = next(named, None)
        if current != key:
            yield item


class Collection:
    def __init__(self, store: MetadataStore, backend: Backend, delete_workers: int = 8) -> None:
        self.store = store
        self.backend = backend
        self.queries = JobQueries(store)
        # Object stores wait on the network, so many requests go at once (a store that
        # deletes in the background on its own, such as the filesystem, is left to it).
        self.delete_workers = delete_workers
        self._pool: ThreadPoolExecutor | None = None  # one pool: threads per batch cost more than deletes

    def mark(self, cutoff: float) -> Iterator[list[CollectibleBlob]]:
        """Candidates in pages of ``BATCH``, in digest order (what a dry run reports)."""
        after = ""
        while True:
            page = self.queries.collectible_blobs(self.store.read(), cutoff, after, BATCH)
            if not page:
                return
            yield page
            after = page[-1].digest

    def warm_up(self) -> None:
        """Before a sweep that will touch most pages of the blob tables (many candidates), read
        the metadata file into the page cache in the background (``readahead``): a sweep on a
        cold cache reads them one random page at a time. A run with little to do skips it."""
        if self.queries.unreferenced_at_least(self.store.read(), READ_AHEAD_CANDIDATES):
            self.store.read_ahead()

    def sweep(self, cutoff: float, after: str = "", settled: Sequence[Settled] = ()) -> QueuedCopies:
        """Tombstone the next page of blobs after ``after`` that are collectible now, chosen
        in the write transaction itself (so a candidate is never stale). The same transaction
        forgets ``settled``, copies already deleted (one commit per page instead of two)."""
        with self.store.write() as conn:
            self.queries.prepare_bulk(conn)
            self.queries.forget_deleted(conn, settled)
            return self.queries.tombstone_next(conn, after, cutoff, BATCH, time.time())

    def start_deleting(self, queued: QueuedCopies, gently: bool = False) -> Callable[[], PurgeResult]:
        """Start deleting, in the background, queued copies (a committed sweep's page); the
        returned call waits for them and tells what went. Their queue entries stay until a
        later transaction forgets ``settled``; a crash before that leaves them for ``purge``.
        ``gently`` while requests are writing: a store that deletes in the background keeps
        its share of the disk small."""
        deleting = self._start_delete([blob.storage_key for blob in queued.blobs], gently)

        def outcome() -> PurgeResult:
            failed = set(deleting())
            result = PurgeResult(failed=sorted(failed))
            gone, kept = [], []
            for blob in queued.blobs:
                if blob.storage_key in failed:
                    kept.append(blob)
                else:
                    gone.append(blob.storage_key)
                    result.deleted += 1
                    result.bytes += blob.size
            if queued.page is None:
                result.settled.append(Settled(gone, [], []))  # failed entries simply stay
            else:
                result.settled.append(Settled([], [queued.page], kept))
            return result

        return outcome

    def delete_copies(self, queued: QueuedCopies) -> PurgeResult:
        return self.start_deleting(queued)()

    def forget(self, settled: Sequence[Settled]) -> None:
        # Not fsynced: if a power loss undoes it, the next run deletes (idempotently: a copy's
        # key is never reused) and forgets again.
        if settled:
            with self.store.write(durable=False) as conn:
                self.queries.forget_deleted(conn, settled)

    def purge(self) -> PurgeResult:
        """Delete every queued copy (in batches, in parallel) and forget those that went. A
        page's copies that fail are queued singly for the next run."""
        result = PurgeResult()
        while True:
            batch = self.queries.doomed(self.store.read(), BATCH)
            batch = [blob for blob in batch if blob.storage_key not in result.failed]
            if not batch:
                break
            self._purged(result, self.delete_copies(QueuedCopies(None, batch)))
        while pages := self.queries.doomed_pages(self.store.read(), 8):
            for page in pages:
                self._purged(result, self.delete_copies(page))
        return result

    def _purged(self, result: PurgeResult, deleted: PurgeResult) -> None:
        self.forget(deleted.settled)
        result.deleted += deleted.deleted
        result.bytes += deleted.bytes
        result.failed.extend(deleted.failed)

    def _start_delete(self, keys: list[str], gently: bool = False) -> Callable[[], list[str]]:
        """Start the backend's batch delete (in the pool, several batches at once, unless the
        store deletes in the background itself); the returned call gives the failed keys."""
        if not keys:
            return list
        if isinstance(self.backend, DeletesInBackground):
            return self.backend.start_delete_many(keys, gently)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.delete_workers, thread_name_prefix="gc-delete")
        futures = [
            self._pool.submit(self.backend.delete_many, keys[i : i + 100]) for i in range(0, len(keys), 100)
        ]
        return lambda: [key for future in futures for key in future.result()]

    def _delete(self, keys: list[str]) -> list[str]:
        return self._start_delete(keys)()

    def queued(self) -> list[CollectibleBlob]:
        conn = self.store.read()
        paged = [blob for page in self.queries.doomed_pages(conn, 1_000_000) for blob in page.blobs]
        return self.queries.doomed(conn, 1_000_000) + paged

    def leaks(self, cutoff: float) -> list[ObjectInfo]:
        """Stored objects that no row names, last modified before ``cutoff``.

        The store's listing and the keys the rows name are walked side by side, both in key
        order, so no key is looked up one by one. The suspects are re-checked one by one
        before anything is deleted (``delete_leaks``), so a listing out of order costs work,
        never a blob.
        """
        named = self.queries.named_keys(self.store.read())
        if isinstance(self.backend, ListsNames):
            suspects = _missing(self.backend.list_names(BLOB_PREFIX), named, lambda key: key)
            found: Iterable[ObjectInfo] = (info for key in suspects for info in self._stat(key))
        else:
            found = _missing(self.backend.list(BLOB_PREFIX), named, lambda info: info.key)
        return [info for info in found if info.modified < cutoff]

    def _stat(self, key: str) -> Iterator[ObjectInfo]:
        with contextlib.suppress(ObjectNotFound):  # deleted meanwhile
            yield self.backend.stat(key)

    def _unknown(self, page: list[ObjectInfo]) -> list[ObjectInfo]:
        known = self.queries.known_keys(self.store.read(), [info.key for info in page])
        return [info for info in page if info.key not in known]

    def delete_leaks(self, leaks: list[ObjectInfo], cutoff: float) -> PurgeResult:
        """Delete leaked objects, re-checking first that no row started naming them."""
        result = PurgeResult()
        still = self._unknown([info for info in leaks if info.modified < cutoff])
        failed = set(self._delete([info.key for info in still])) if still else set()
        for info in still:
            if info.key in failed:
                result.failed.append(info.key)
            else:
                result.deleted += 1
                result.bytes += info.size
        return result

    def orphan_referrers(self, cutoff: float) -> list[tuple[str, str]]:
        return self.queries.orphan_referrers(self.store.read(), cutoff, 10_000)
