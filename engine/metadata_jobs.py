"""SQL for the background jobs: garbage collection, leases and run reports.

Part of the metadata layer (all SQL lives in ``metadata*.py`` and the migrations);
kept apart from ``metadata.py`` so each file stays about one concept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cargohold.engine.metadata import Conn, MetadataStore


@dataclass(frozen=True, slots=True)
class CollectibleBlob:
    digest: str
    storage_key: str
    size: int


@dataclass(frozen=True, slots=True)
class QueuedCopies:
    """Physical copies waiting for deletion: one sweep page's (``page`` is its row in
    ``doomed_pages``, queued as one row), or single entries of ``doomed_objects`` (``page``
    None: copies a re-upload replaced, leaks fsck found, copies whose delete failed)."""

    page: int | None
    blobs: list[CollectibleBlob]


@dataclass(frozen=True, slots=True)
class Settled:
    """What became of queued copies whose deletes finished, for the queue to forget: single
    entries that went, pages whose every copy was tried, and those pages' copies that could
    not be deleted (they stay queued, one entry each)."""

    gone: list[str]
    pages: list[int]
    failed: list[CollectibleBlob]


@dataclass(frozen=True, slots=True)
class JobRun:
    id: int
    kind: str
    dry_run: bool
    status: str
    started_at: float
    finished_at: float | None
    summary: dict[str, Any]


# The storage keys the queued sweep pages name.
_PAGED_KEYS = (
    "SELECT json_extract(copy.value, '$[0]') AS storage_key "
    "FROM doomed_pages, json_each(doomed_pages.copies) copy"
)


def _marks(items: Sequence[object]) -> str:
    return ",".join("?" * len(items))


class JobQueries:
    """The statements the GC and the schedulers run, on the registry's metadata store."""

    def __init__(self, store: MetadataStore) -> None:
        self.store = store

    # -- blobs ----------------------------------------------------------------------------
    def collectible_blobs(self, conn: Conn, cutoff: float, after: str, limit: int) -> list[CollectibleBlob]:
        """Live blobs no manifest references and nothing touched since ``cutoff`` (paged)."""
        rows = conn.execute(
            "SELECT digest, storage_key, size FROM blobs WHERE state = 'live' AND manifest_refs = 0 "
            "AND touched_at < ? AND digest > ? ORDER BY digest LIMIT ?",
            (cutoff, after, limit),
        )
        return [CollectibleBlob(*row) for row in rows]

    def prepare_bulk(self, conn: Conn) -> None:
        """A page cache big enough for a sweep's pages (the default 2 MiB re-reads them)."""
        conn.execute("PRAGMA cache_size = -32768")

    def unreferenced_at_least(self, conn: Conn, count: int) -> bool:
        """Whether ``count`` or more live blobs are unreferenced (counted in the partial
        index, stopping at ``count``)."""
        row = conn.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM blobs WHERE manifest_refs = 0 AND state = 'live' LIMIT ?)",
            (count,),
        ).fetchone()
        return bool(row[0] >= count)

    def tombstone_next(self, conn: Conn, after: str, cutoff: float, limit: int, now: float) -> QueuedCopies:
        """Find and tombstone, in the caller's write transaction, the next ``limit`` blobs after
        ``after`` (digest order) that are unreferenced and idle since ``cutoff``. Choosing them
        inside the write transaction is the re-check: a manifest PUT that committed first
        references its blobs, one that commits later finds them gone. Their rows and links go
        now (the digest answers 404 at once) and their copies are queued, with their sizes,
        for physical deletion, as one row (a row per copy cost a sweep a fifth of its SQL)."""
        rows = conn.execute(
            "DELETE FROM blobs WHERE digest IN (SELECT digest FROM blobs WHERE manifest_refs = 0 "
            "AND state = 'live' AND digest > ? AND touched_at < ? ORDER BY digest LIMIT ?) "
            "RETURNING digest, storage_key, size",
            (after, cutoff, limit),
        ).fetchall()
        if not rows:
            return QueuedCopies(None, [])
        doomed = sorted((CollectibleBlob(*row) for row in rows), key=lambda blob: blob.digest)
        gone = json.dumps([blob.digest for blob in doomed])
        links = self.store.quota_counts.repository_links(conn, gone)
        conn.execute("DELETE FROM repository_blobs WHERE digest IN (SELECT value FROM json_each(?))", (gone,))
        self.store.quota_counts.unlinked(conn, links)
        copies = json.dumps([[blob.storage_key, blob.size] for blob in doomed], separators=(",", ":"))
        page = conn.execute("INSERT INTO doomed_pages (queued_at, copies) VALUES (?, ?)", (now, copies))
        return QueuedCopies(page.lastrowid, doomed)

    def doomed(self, conn: Conn, limit: int) -> list[CollectibleBlob]:
        """Single queued copies with their sizes (0 if unknown: a leak queued by fsck)."""
        rows = conn.execute(
            "SELECT storage_key, COALESCE(digest, ''), COALESCE(size, 0) FROM doomed_objects "
            "ORDER BY queued_at LIMIT ?",
            (limit,),
        )
        return [CollectibleBlob(digest, key, size) for key, digest, size in rows]

    def doomed_pages(self, conn: Conn, limit: int) -> list[QueuedCopies]:
        """The oldest queued sweep pages."""
        rows = conn.execute("SELECT id, copies FROM doomed_pages ORDER BY id LIMIT ?", (limit,))
        return [
            QueuedCopies(page, [CollectibleBlob("", key, size) for key, size in json.loads(copies)])
            for page, copies in rows
        ]

    def forget_deleted(self, conn: Conn, settled: Sequence[Settled]) -> None:
        """Drop the queue entries of copies that are gone (a failed copy of a page stays queued
        on its own)."""
        for done in settled:
            if gone := done.gone:
                conn.execute(f"DELETE FROM doomed_objects WHERE storage_key IN ({_marks(gone)})", gone)
            if done.pages:
                conn.execute(f"DELETE FROM doomed_pages WHERE id IN ({_marks(done.pages)})", done.pages)
            conn.executemany(
                "INSERT OR IGNORE INTO doomed_objects (storage_key, digest, size, queued_at) "
                "VALUES (?, ?, ?, ?)",
                ((blob.storage_key, blob.digest or None, blob.size, time.time()) for blob in done.failed),
            )

    def named_keys(self, conn: Conn) -> Iterator[str]:
        """Every key a blob row, a deletion queue entry or an upload session names, ascending
        (a key named twice comes twice: sorting without removing duplicates is cheaper)."""
        yield from (
            row[0]
            for row in conn.execute(
                "SELECT storage_key FROM blobs UNION ALL SELECT storage_key FROM doomed_objects "
                f"UNION ALL {_PAGED_KEYS} "
                "UNION ALL SELECT storage_key FROM uploads WHERE storage_key IS NOT NULL ORDER BY 1"
            )
        )

    def known_keys(self, conn: Conn, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` a blob row, a deletion queue entry or an upload session names
        (a scan of the blob rows: only for the few suspects a leak scan found)."""
        found: set[str] = set()
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = _marks(part)
            for sql in (
                f"SELECT storage_key FROM blobs WHERE storage_key IN ({marks})",
                f"SELECT storage_key FROM doomed_objects WHERE storage_key IN ({marks})",
                f"SELECT * FROM ({_PAGED_KEYS}) WHERE storage_key IN ({marks})",
                f"SELECT storage_key FROM uploads WHERE storage_key IN ({marks})",
            ):
                found.update(row[0] for row in conn.execute(sql, part))
        return found

    def orphan_referrers(self, conn: Conn, cutoff: float, limit: int) -> list[tuple[str, str]]:
        """(repository, digest) of untagged manifests whose subject is not in their repository,
        created before ``cutoff`` (a subject may legitimately be pushed after its referrer)."""
        rows = conn.execute(
            "SELECT r.name, m.digest FROM manifests m JOIN repositories r ON r.id = m.repository_id "
            "WHERE m.subject IS NOT NULL AND m.created_at < ? "
            "AND NOT EXISTS (SELECT 1 FROM manifests s WHERE s.repository_id = m.repository_id "
            "AND s.digest = m.subject) "
            "AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository_id = m.repository_id "
            "AND t.manifest_digest = m.digest) "
            "AND NOT EXISTS (SELECT 1 FROM manifest_references x WHERE x.repository_id = m.repository_id "
            "AND x.target_digest = m.digest AND x.kind = 'manifest') LIMIT ?",
            (cutoff, limit),
        )
        return [(row[0], row[1]) for row in rows]

    def repository_usage(self, conn: Conn) -> list[tuple[str, int, int, int]]:
        """(repository, blobs, bytes referenced, bytes no other repository links), largest first."""
        rows = conn.execute(
            "SELECT r.name, COUNT(*), COALESCE(SUM(b.size), 0), "
            "COALESCE(SUM(CASE WHEN b.repo_links = 1 THEN b.size ELSE 0 END), 0) "
            "FROM repository_blobs rb JOIN repositories r ON r.id = rb.repository_id "
            "JOIN blobs b ON b.digest = rb.digest AND b.state = 'live' GROUP BY r.name ORDER BY 3 DESC"
        )
        return [(row[0], row[1], row[2], row[3]) for row in rows]

    def store_usage(self, conn: Conn) -> tuple[int, int]:
        """(live blobs, bytes stored once each)."""
        row = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs WHERE state = 'live'"
        ).fetchone()
        return row[0], row[1]

    # -- scrub ------------------------------------------------------------------------------
    def blobs_after(self, conn: Conn, cursor: str, limit: int) -> list[tuple[str, str, int, str | None]]:
        """(digest, key, size, checksum) of live blobs after ``cursor`` in digest order."""
        return conn.execute(
            "SELECT digest, storage_key, size, checksum FROM blobs WHERE state = 'live' AND digest > ? "
            "ORDER BY digest LIMIT ?",
            (cursor, limit),
        ).fetchall()

    def record_checksum(self, conn: Conn, digest: str, key: str, checksum: str) -> None:
        conn.execute(
            "UPDATE blobs SET checksum = ? WHERE digest = ? AND storage_key = ? AND checksum IS NULL",
            (checksum, digest, key),
        )

    def quarantine(self, conn: Conn, digest: str, key: str) -> bool:
        """Take a corrupt copy out of service, if the row still names that copy."""
        cur = conn.execute(
            "UPDATE blobs SET state = 'quarantined' WHERE digest = ? AND storage_key = ? AND state = 'live'",
            (digest, key),
        )
        return cur.rowcount == 1

    # -- leases ---------------------------------------------------------------------------
    def acquire_lease(self, conn: Conn, name: str, owner: str, ttl: float, now: float) -> bool:
        """Take or renew the lease ``name``; False while someone else holds it."""
        conn.execute(
            "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "owner = excluded.owner, expires_at = excluded.expires_at "
            "WHERE leases.owner = excluded.owner OR leases.expires_at < ?",
            (name, owner, now + ttl, now),
        )
        row = conn.execute("SELECT owner FROM leases WHERE name = ?", (name,)).fetchone()
        return row is not None and row[0] == owner

    def lease_owner(self, conn: Conn, name: str) -> str | None:
        row = conn.execute("SELECT owner FROM leases WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def take_over_lease(self, conn: Conn, name: str, holder: str, owner: str, ttl: float, now: float) -> bool:
        cur = conn.execute(
            "UPDATE leases SET owner = ?, expires_at = ? WHERE name = ? AND owner = ?",
            (owner, now + ttl, name, holder),
        )
        return cur.rowcount == 1

    def release_lease(self, conn: Conn, name: str, owner: str) -> None:
        conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    # -- settings changed at run time -------------------------------------------------------
    def admin_setting(self, conn: Conn, name: str) -> str | None:
        row = conn.execute("SELECT value FROM admin_settings WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_admin_setting(self, conn: Conn, name: str, value: str | None) -> None:
        if value is None:
            conn.execute("DELETE FROM admin_settings WHERE name = ?", (name,))
            return
        conn.execute(
            "INSERT INTO admin_settings (name, value, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (name, value, time.time()),
        )

    # -- run reports ----------------------------------------------------------------------
    def start_run(self, conn: Conn, kind: str, dry_run: bool) -> int:
        cur = conn.execute(
            "INSERT INTO job_runs (kind, dry_run, status, started_at) VALUES (?, ?, 'running', ?)",
            (kind, int(dry_run), time.time()),
        )
        return int(cur.lastrowid or 0)

    def finish_run(self, conn: Conn, run_id: int, status: str, summary: dict[str, Any]) -> None:
        conn.execute(
            "UPDATE job_runs SET status = ?, finished_at = ?, summary = ? WHERE id = ?",
            (status, time.time(), json.dumps(summary, separators=(",", ":")), run_id),
        )

    def last_leak_scan(self, conn: Conn) -> float | None:
        """When the newest GC run that listed the store for leaks (and finished) started."""
        row = conn.execute(
            "SELECT MAX(started_at) FROM job_runs WHERE kind = 'gc' AND dry_run = 0 "
            "AND status IN ('succeeded', 'partial') AND json_extract(summary, '$.leak_scan')"
        ).fetchone()
        return row[0]

    def run_counts(self, conn: Conn) -> dict[tuple[str, str], int]:
        rows = conn.execute(
            "SELECT kind, status, COUNT(*) FROM job_runs WHERE dry_run = 0 GROUP BY kind, status"
        )
        return {(row[0], row[1]): row[2] for row in rows}

    def quarantined_blobs(self, conn: Conn) -> int:
        return int(conn.execute("SELECT COUNT(*) FROM blobs WHERE state = 'quarantined'").fetchone()[0])

    def open_uploads(self, conn: Conn) -> int:
        return int(conn.execute("SELECT COUNT(*) FROM uploads").fetchone()[0])

    def runs(self, conn: Conn, kind: str | None, limit: int) -> list[JobRun]:
        sql = "SELECT id, kind, dry_run, status, started_at, finished_at, summary FROM job_runs"
        params: list[object] = []
        if kind is not None:
            sql += " WHERE kind = ?"
            params.append(kind)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [
            JobRun(r[0], r[1], bool(r[2]), r[3], r[4], r[5], json.loads(r[6]) if r[6] else {})
            for r in conn.execute(sql, params)
        ]
