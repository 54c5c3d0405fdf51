"""SQL for storage quotas: deduplicated usage per namespace (a repository glob).

Part of the metadata layer (all SQL lives in ``metadata*.py`` and the migrations). A
namespace that has a ``quota_usage`` row is counted: ``quota_objects`` holds each digest
linked into any of its repositories (a blob in ``repository_blobs``, a manifest in
``manifests``) once, with how many such rows name it, and ``quota_usage.bytes`` the sum of
their sizes. The metadata store calls ``linked`` / ``unlinked`` in the same transaction as
every change to those rows, for every counted namespace whatever the process's own
configuration says, so a row that exists is always exact; ``count`` builds one from
scratch (a namespace newly configured, or one whose row another process dropped).

Imports nothing of ``metadata`` (which calls into this module).
"""

from __future__ import annotations

import functools
import json
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from cargohold.engine.names import repository_glob

Conn = sqlite3.Connection


@dataclass(frozen=True, slots=True)
class NamespaceRow:
    id: int
    pattern: str
    bytes: int
    objects: int
    limit_bytes: int
    warn_bytes: int
    warned: bool


_NAMESPACE_COLUMNS = "id, pattern, bytes, objects, limit_bytes, warn_bytes, warned"
# (digest, links, size) of every blob link and manifest row in the repositories of a JSON id list
# (bound twice): what quota_objects holds for a namespace.
_LINKS = (
    "SELECT digest, COUNT(*) AS links, MAX(size) AS size FROM ("
    "SELECT rb.digest AS digest, b.size AS size FROM repository_blobs rb "
    "JOIN blobs b ON b.digest = rb.digest "
    "WHERE rb.repository_id IN (SELECT value FROM json_each(?)) "
    "UNION ALL SELECT digest, size FROM manifests WHERE repository_id IN (SELECT value FROM json_each(?))"
    ") GROUP BY digest"
)


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    return repository_glob(pattern)


class QuotaQueries:
    """Statements on ``quota_usage`` and ``quota_objects``; callers pass the connection."""

    # -- the counters, in the transaction of the change they follow ------------------------
    def linked(self, conn: Conn, repository_id: int, digest: str, size: int | None = None) -> None:
        """A repository_blobs or manifests row naming ``digest`` was added to the repository."""
        namespaces = self._counted_for(conn, repository_id)
        if not namespaces:
            return
        if size is None:
            row = conn.execute("SELECT size FROM blobs WHERE digest = ?", (digest,)).fetchone()
            size = int(row[0]) if row else 0
        for quota_id in namespaces:
            links = conn.execute(
                "INSERT INTO quota_objects (quota_id, digest, links, size) VALUES (?, ?, 1, ?) "
                "ON CONFLICT (quota_id, digest) DO UPDATE SET links = links + 1 RETURNING links",
                (quota_id, digest, size),
            ).fetchone()[0]
            if links == 1:
                conn.execute(
                    "UPDATE quota_usage SET bytes = bytes + ?, objects = objects + 1 WHERE id = ?",
                    (size, quota_id),
                )

    def unlinked(self, conn: Conn, pairs: Iterable[tuple[int, str]]) -> None:
        """(repository id, digest) rows of repository_blobs or manifests went."""
        namespaces: dict[int, list[int]] = {}
        for repository_id, digest in pairs:
            if repository_id not in namespaces:
                namespaces[repository_id] = self._counted_for(conn, repository_id)
            for quota_id in namespaces[repository_id]:
                self._drop_link(conn, quota_id, digest)

    def _drop_link(self, conn: Conn, quota_id: int, digest: str) -> None:
        row = conn.execute(
            "UPDATE quota_objects SET links = links - 1 WHERE quota_id = ? AND digest = ? "
            "RETURNING links, size",
            (quota_id, digest),
        ).fetchone()
        if row is None or row[0] > 0:
            return
        conn.execute("DELETE FROM quota_objects WHERE quota_id = ? AND digest = ?", (quota_id, digest))
        # Back under the warning mark: the next crossing warns again.
        conn.execute(
            "UPDATE quota_usage SET bytes = bytes - ?, objects = objects - 1, "
            "warned = CASE WHEN bytes - ? < warn_bytes THEN 0 ELSE warned END WHERE id = ?",
            (row[1], row[1], quota_id),
        )

    def repository_links(self, conn: Conn, digests: str) -> list[tuple[int, str]]:
        """(repository id, digest) of the repository_blobs rows naming ``digests`` (a JSON
        list), if any namespace is counted (the GC's tombstones drop such rows in bulk)."""
        if not self.any_counted(conn):
            return []
        rows = conn.execute(
            "SELECT repository_id, digest FROM repository_blobs "
            "WHERE digest IN (SELECT value FROM json_each(?))",
            (digests,),
        )
        return [(row[0], row[1]) for row in rows]

    def any_counted(self, conn: Conn) -> bool:
        return conn.execute("SELECT 1 FROM quota_usage LIMIT 1").fetchone() is not None

    def _counted_for(self, conn: Conn, repository_id: int) -> list[int]:
        """The counted namespaces the repository belongs to (usually none: one tiny query)."""
        namespaces = conn.execute("SELECT id, pattern FROM quota_usage").fetchall()
        if not namespaces:
            return []
        row = conn.execute("SELECT name FROM repositories WHERE id = ?", (repository_id,)).fetchone()
        if row is None:
            return []
        return [quota_id for quota_id, pattern in namespaces if _glob(pattern).fullmatch(row[0])]

    # -- namespaces ---------------------------------------------------------------------------
    def namespaces(self, conn: Conn) -> list[NamespaceRow]:
        rows = conn.execute(f"SELECT {_NAMESPACE_COLUMNS} FROM quota_usage ORDER BY pattern")
        return [NamespaceRow(*row) for row in rows]

    def namespace(self, conn: Conn, pattern: str) -> NamespaceRow | None:
        row = conn.execute(
            f"SELECT {_NAMESPACE_COLUMNS} FROM quota_usage WHERE pattern = ?", (pattern,)
        ).fetchone()
        return NamespaceRow(*row) if row else None

    def count(self, conn: Conn, pattern: str, limit_bytes: int, warn_bytes: int, now: float) -> NamespaceRow:
        """Count the namespace from the link rows (a scan of its repositories' rows), replacing
        any count it had. In a write transaction, so no change slips between count and upkeep."""
        ids = self._repository_ids(conn, pattern)
        quota_id = conn.execute(
            "INSERT INTO quota_usage (pattern, limit_bytes, warn_bytes, counted_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (pattern) DO UPDATE SET limit_bytes = excluded.limit_bytes, "
            "warn_bytes = excluded.warn_bytes, counted_at = excluded.counted_at RETURNING id",
            (pattern, limit_bytes, warn_bytes, now),
        ).fetchone()[0]
        conn.execute("DELETE FROM quota_objects WHERE quota_id = ?", (quota_id,))
        conn.execute(
            f"INSERT INTO quota_objects (quota_id, digest, links, size) SELECT ?, * FROM ({_LINKS})",
            (quota_id, ids, ids),
        )
        conn.execute(
            "UPDATE quota_usage SET (bytes, objects) = (SELECT COALESCE(SUM(size), 0), COUNT(*) "
            "FROM quota_objects WHERE quota_id = ?) WHERE id = ?",
            (quota_id, quota_id),
        )
        found = self.namespace(conn, pattern)
        assert found is not None
        return found

    def drift(self, conn: Conn, row: NamespaceRow) -> tuple[int, int] | None:
        """(bytes, objects) counted afresh from the link rows, if the counters disagree (fsck)."""
        ids = self._repository_ids(conn, row.pattern)
        counted = conn.execute(
            f"SELECT COALESCE(SUM(size), 0), COUNT(*) FROM ({_LINKS})", (ids, ids)
        ).fetchone()
        rows = conn.execute("SELECT COUNT(*) FROM quota_objects WHERE quota_id = ?", (row.id,))
        if (row.bytes, row.objects, rows.fetchone()[0]) == (counted[0], counted[1], counted[1]):
            return None
        return int(counted[0]), int(counted[1])

    def _repository_ids(self, conn: Conn, pattern: str) -> str:
        """The ids of the namespace's repositories, as a JSON array (for ``json_each``)."""
        glob = _glob(pattern)
        return json.dumps(
            [rid for rid, name in conn.execute("SELECT id, name FROM repositories") if glob.fullmatch(name)]
        )

    def set_limits(self, conn: Conn, quota_id: int, limit_bytes: int, warn_bytes: int) -> None:
        conn.execute(
            "UPDATE quota_usage SET limit_bytes = ?, warn_bytes = ? WHERE id = ? "
            "AND (limit_bytes != ? OR warn_bytes != ?)",
            (limit_bytes, warn_bytes, quota_id, limit_bytes, warn_bytes),
        )

    def drop(self, conn: Conn, pattern: str) -> None:
        """Stop counting a namespace no longer configured."""
        row = conn.execute("DELETE FROM quota_usage WHERE pattern = ? RETURNING id", (pattern,)).fetchone()
        if row is not None:
            conn.execute("DELETE FROM quota_objects WHERE quota_id = ?", (row[0],))

    def mark_warned(self, conn: Conn, quota_id: int) -> None:
        conn.execute("UPDATE quota_usage SET warned = 1 WHERE id = ?", (quota_id,))

    def holds(self, conn: Conn, quota_id: int, digest: str) -> bool:
        """Whether the namespace already counts ``digest`` (linking it again costs nothing)."""
        row = conn.execute(
            "SELECT 1 FROM quota_objects WHERE quota_id = ? AND digest = ?", (quota_id, digest)
        ).fetchone()
        return row is not None
