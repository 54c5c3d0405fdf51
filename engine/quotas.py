"""Storage quotas per namespace, counted with dedup and enforced in the push's own transaction.

A quota names a namespace by a repository glob (``team-a/**``) and a byte limit. Its use
is the bytes of the distinct blobs and manifests linked into any repository the glob
matches: a layer ten images of the namespace share counts once, a blob the namespace
already holds costs nothing to link again, and a blob mounted (or deduplicated) from
outside the namespace counts, being new to it. The counters live in the metadata store
(``metadata_quotas``) and change in the same transaction as the links they count, so
reading a namespace's use is one row, never a scan.

Enforcement, from the earliest to the final word:

1. before bytes are received: a chunk or a blob whose declared length cannot fit in what
   the namespace has left is refused (PATCH, PUT, monolithic POST), and a body without a
   declared length is cut off once it no longer fits. This assumes the blob is new to the
   namespace (the digest is not known yet), and reads the use outside any transaction;
2. before an upload's bytes are committed: the digest and size are known, in a write
   transaction; a digest the namespace already holds costs nothing;
3. the change itself (linking a finished upload, a mount, a manifest PUT): after the rows
   change, in the same write transaction, every namespace the repository belongs to is
   checked and the transaction rolled back if the change took one over its limit. SQLite
   serialises write transactions, so concurrent pushes cannot jointly exceed a quota.

Refusals are ``QuotaExceeded`` (DENIED, 403) naming the quota. A change that adds nothing
(moving a tag) is never refused, even in a namespace that is over (a lowered limit).

Crossing the warning mark (``warn_at``, 80% by default) writes one ``quota.warning``
event in the same transaction; a namespace warns again only after falling back under it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from cargohold.engine.errors import QuotaExceeded
from cargohold.engine.events import EventLog
from cargohold.engine.metadata import Conn, MetadataStore
from cargohold.engine.metadata_quotas import NamespaceRow
from cargohold.engine.names import repository_glob
from cargohold.engine.usage import QuotaUse, human_size


@dataclass(frozen=True, slots=True)
class Quota:
    repositories: str  # the namespace: a repository glob
    limit_bytes: int
    warn_at: float = 0.8  # share of the limit that triggers the warning event

    @property
    def warn_bytes(self) -> int:
        return int(self.limit_bytes * self.warn_at)


def _exceeded(quota: Quota, used: int, needed: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"storage quota of {quota.repositories} exceeded: {human_size(used)} of "
        f"{human_size(quota.limit_bytes)} used, this push needs {human_size(needed)} more",
        detail={
            "quota": quota.repositories,
            "limit_bytes": quota.limit_bytes,
            "used_bytes": used,
            "needed_bytes": needed,
        },
    )


class Quotas:
    def __init__(self, store: MetadataStore, quotas: Sequence[Quota], events: EventLog) -> None:
        self.store = store
        self.quotas = list(quotas)
        self.events = events
        self.queries = store.quota_counts
        self._globs = [(quota, repository_glob(quota.repositories)) for quota in self.quotas]

    def of(self, repository: str) -> list[Quota]:
        return [quota for quota, glob in self._globs if glob.fullmatch(repository)]

    def sync(self) -> None:
        """Count the configured namespaces not counted yet (a scan each, once), update limits,
        and stop counting namespaces no longer configured. Writes only when something changed."""
        wanted = {quota.repositories: quota for quota in self.quotas}
        counted = {row.pattern: row for row in self.queries.namespaces(self.store.read())}
        if counted.keys() == wanted.keys() and all(
            (row.limit_bytes, row.warn_bytes) == (wanted[p].limit_bytes, wanted[p].warn_bytes)
            for p, row in counted.items()
        ):
            return
        now = time.time()
        with self.store.write() as conn:
            for row in self.queries.namespaces(conn):
                if row.pattern not in wanted:
                    self.queries.drop(conn, row.pattern)
            for quota in self.quotas:
                self._namespace(conn, quota, now)

    def _namespace(self, conn: Conn, quota: Quota, now: float) -> NamespaceRow:
        """The namespace's counters, counted now if no process counts it yet."""
        row = self.queries.namespace(conn, quota.repositories)
        if row is None:
            return self.queries.count(conn, quota.repositories, quota.limit_bytes, quota.warn_bytes, now)
        if (row.limit_bytes, row.warn_bytes) != (quota.limit_bytes, quota.warn_bytes):
            self.queries.set_limits(conn, row.id, quota.limit_bytes, quota.warn_bytes)
        return row

    # -- 1. before bytes arrive (outside any transaction) ---------------------------------------
    def _room(self, repository: str) -> tuple[Quota, int] | None:
        """The repository's tightest quota and the bytes left in it."""
        tightest: tuple[Quota, int] | None = None
        conn = self.store.read()
        for quota in self.of(repository):
            row = self.queries.namespace(conn, quota.repositories)
            left = quota.limit_bytes - (row.bytes if row is not None else 0)
            if tightest is None or left < tightest[1]:
                tightest = (quota, left)
        return tightest

    def admit(
        self, repository: str, chunks: Iterable[bytes], received: int, length: int | None
    ) -> Iterable[bytes]:
        """The chunks of an upload that holds ``received`` bytes, refused up front when the
        declared ``length`` cannot fit, or cut off as soon as they stop fitting."""
        room = self._room(repository)
        if room is None:
            return chunks
        quota, left = room
        if length is not None:
            if received + length > left:
                raise _exceeded(quota, quota.limit_bytes - left, received + length)
            return chunks
        return self._metered(chunks, quota, left, received)

    @staticmethod
    def _metered(chunks: Iterable[bytes], quota: Quota, left: int, received: int) -> Iterator[bytes]:
        for chunk in chunks:
            received += len(chunk)
            if received > left:
                raise _exceeded(quota, quota.limit_bytes - left, received)
            yield chunk

    # -- 2. before an upload's bytes are committed (in a write transaction) ---------------------
    def check_blob(self, conn: Conn, repository: str, digest: str, size: int) -> None:
        now = time.time()
        for quota in self.of(repository):
            row = self._namespace(conn, quota, now)
            if row.bytes + size > quota.limit_bytes and not self.queries.holds(conn, row.id, digest):
                raise _exceeded(quota, row.bytes, size)

    # -- 3. the change itself -------------------------------------------------------------------
    @contextmanager
    def guard(self, conn: Conn, repository: str, now: float) -> Iterator[None]:
        """Wrap the rows a push changes, in its write transaction: refuse (the caller's
        transaction rolls back) a change that took a namespace over its limit; warn once
        when one crosses its warning mark."""
        quotas = self.of(repository)
        if not quotas:
            yield
            return
        before = {quota.repositories: self._namespace(conn, quota, now).bytes for quota in quotas}
        yield
        for quota in quotas:
            row = self.queries.namespace(conn, quota.repositories)
            assert row is not None
            added = row.bytes - before[quota.repositories]
            if added > 0 and row.bytes > quota.limit_bytes:
                raise _exceeded(quota, before[quota.repositories], added)
            if added > 0 and row.bytes >= quota.warn_bytes and not row.warned:
                self.queries.mark_warned(conn, row.id)
                detail = {
                    "quota": quota.repositories,
                    "used_bytes": row.bytes,
                    "limit_bytes": quota.limit_bytes,
                    "warn_bytes": quota.warn_bytes,
                }
                self.events.record_quota_warning(conn, repository, detail, now)

    # -- reporting ------------------------------------------------------------------------------
    def usage(self) -> list[QuotaUse]:
        """The configured quotas and their use (``cargohold du``, the admin API)."""
        self.sync()  # a namespace another process stopped counting is counted again first
        counted = {row.pattern: row for row in self.queries.namespaces(self.store.read())}
        found = []
        for quota in self.quotas:
            row = counted.get(quota.repositories)
            used, objects, warned = (row.bytes, row.objects, row.warned) if row else (0, 0, False)
            found.append(QuotaUse(quota.repositories, quota.limit_bytes, used, objects, bool(warned)))
        return found


__all__ = ["Quota", "QuotaUse", "Quotas"]
