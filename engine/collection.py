"""The engine's half of garbage collection: the steps that must keep the invariants.

The collector in ``cargohold.gc`` decides *when* and reports; these steps decide *what*
may go, each in one transaction:

``mark(cutoff)``
    Live blobs that no manifest references and that nothing touched (upload, mount,
    HEAD, manifest reference) since ``cutoff``. Read-only; a candidate is only a guess.
``sweep(digests, cutoff)``
    Tombstones the candidates that are *still* unreferenced and idle, re-checked in a
    write transaction. A manifest PUT checks its blobs are live in its own write
    transaction, and SQLite serialises the two: either the sweep wins (the PUT answers
    MANIFEST_BLOB_UNKNOWN and the client uploads again) or the PUT wins (the blob is
    referenced and the re-check skips it). A tombstoned blob answers 404 from then on.
``purge()``
    Deletes the queued physical copies, then forgets them. Runs after the tombstones
    committed, so a crash in between only leaves work for the next run (the queue is
    durable): a run can be stopped and resumed at any point. A digest re-uploaded
    meanwhile lives in a new copy with a new key, which the purge never touches.
``leaks(cutoff)``
    Objects in the backend that no row names (a crash between writing an object and
    recording it), older than ``cutoff``; found by listing the backend.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cargohold.backends.base import Backend, ObjectInfo
from cargohold.engine.layout import BLOB_PREFIX
from cargohold.engine.metadata import MetadataStore
from cargohold.engine.metadata_jobs import CollectibleBlob, JobQueries

BATCH = 2000  # blobs per transaction: fewer commits (each an fsync) without holding the lock long


@dataclass
class PurgeResult:
    deleted: int = 0
    bytes: int = 0
    failed: list[str] = field(default_factory=list)


class Collection:
    def __init__(self, store: MetadataStore, backend: Backend, delete_workers: int = 8) -> None:
        self.store = store
        self.backend = backend
        self.queries = JobQueries(store)
        self.delete_workers = delete_workers

    def mark(self, cutoff: float) -> Iterator[list[CollectibleBlob]]:
        """Candidates in pages of ``BATCH``, in digest order."""
        after = ""
        while True:
            page = self.queries.collectible_blobs(self.store.read(), cutoff, after, BATCH)
            if not page:
                return
            yield page
            after = page[-1].digest

    def sweep(self, digests: list[str], cutoff: float) -> list[CollectibleBlob]:
        with self.store.write() as conn:
            return self.queries.tombstone(conn, digests, cutoff, time.time())

    def purge(self) -> PurgeResult:
        """Delete every queued copy (in batches, in parallel) and forget those that went."""
        result = PurgeResult()
        while True:
            batch = self.queries.doomed(self.store.read(), BATCH)
            batch = [blob for blob in batch if blob.storage_key not in result.failed]
            if not batch:
                return result
            keys = [blob.storage_key for blob in batch]
            failed = set(self._delete(keys))
            gone = [blob for blob in batch if blob.storage_key not in failed]
            # Not fsynced: if a power loss undoes it, the next run deletes (idempotently) and forgets again.
            with self.store.write(durable=False) as conn:
                self.queries.forget_deleted(conn, [blob.storage_key for blob in gone])
            result.deleted += len(gone)
            result.bytes += sum(blob.size for blob in gone)
            result.failed.extend(sorted(failed))

    def _delete(self, keys: list[str]) -> list[str]:
        """The backend's batch delete, several batches at once for stores with latency."""
        chunks = [keys[i : i + 100] for i in range(0, len(keys), 100)]
        if len(chunks) == 1:
            return self.backend.delete_many(keys)
        with ThreadPoolExecutor(min(self.delete_workers, len(chunks))) as pool:
            return [key for failed in pool.map(self.backend.delete_many, chunks) for key in failed]

    def queued(self) -> list[CollectibleBlob]:
        return self.queries.doomed(self.store.read(), 1_000_000)

    def leaks(self, cutoff: float) -> list[ObjectInfo]:
        """Stored objects that no row names, last modified before ``cutoff``."""
        leaks: list[ObjectInfo] = []
        page: list[ObjectInfo] = []
        for info in self.backend.list(BLOB_PREFIX):
            if info.modified < cutoff:
                page.append(info)
            if len(page) >= BATCH:
                leaks.extend(self._unknown(page))
                page = []
        leaks.extend(self._unknown(page))
        return leaks

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
