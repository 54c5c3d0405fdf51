"""SQL for ``fsck``: each query finds one kind of disagreement between rows.

Part of the metadata layer (SQL lives only in ``metadata*.py`` and the migrations).
"""

from __future__ import annotations

from collections.abc import Iterator

from cargohold.engine.metadata import Conn

_REFCOUNTS = (
    "SELECT digest, manifest_refs, counted_refs, repo_links, counted_links FROM ("
    "SELECT b.digest, b.manifest_refs, b.repo_links, "
    "(SELECT COUNT(*) FROM manifest_references r WHERE r.target_digest = b.digest AND r.kind = 'blob') "
    "AS counted_refs, (SELECT COUNT(*) FROM repository_blobs rb WHERE rb.digest = b.digest) AS counted_links "
    "FROM blobs b WHERE b.state = 'live') WHERE manifest_refs != counted_refs OR repo_links != counted_links"
)


class FsckQueries:
    def live_blobs(self, conn: Conn) -> Iterator[tuple[str, str, int]]:
        """(digest, storage key, size) of every live blob."""
        yield from conn.execute("SELECT digest, storage_key, size FROM blobs WHERE state = 'live'")

    def refcount_drift(self, conn: Conn) -> list[tuple[str, int, int, int, int]]:
        """(digest, manifest_refs, counted, repo_links, counted) where a counter is wrong."""
        return conn.execute(_REFCOUNTS).fetchall()

    def recount(self, conn: Conn, digests: list[str]) -> None:
        conn.executemany(
            "UPDATE blobs SET manifest_refs = (SELECT COUNT(*) FROM manifest_references r "
            "WHERE r.target_digest = blobs.digest AND r.kind = 'blob'), repo_links = "
            "(SELECT COUNT(*) FROM repository_blobs rb WHERE rb.digest = blobs.digest) WHERE digest = ?",
            ((digest,) for digest in digests),
        )

    def dangling_references(self, conn: Conn) -> list[tuple[str, str, str, str]]:
        """(repository, manifest, target, kind) whose target is not there."""
        return conn.execute(
            "SELECT p.name, r.manifest_digest, r.target_digest, r.kind FROM manifest_references r "
            "JOIN repositories p ON p.id = r.repository_id "
            "WHERE (r.kind = 'blob' AND NOT EXISTS (SELECT 1 FROM blobs b WHERE b.digest = r.target_digest "
            "AND b.state = 'live')) OR (r.kind = 'manifest' AND NOT EXISTS (SELECT 1 FROM manifests m "
            "WHERE m.repository_id = r.repository_id AND m.digest = r.target_digest))"
        ).fetchall()

    def orphan_references(self, conn: Conn) -> list[tuple[str, str]]:
        """(repository, manifest) of reference rows whose manifest is gone."""
        return conn.execute(
            "SELECT DISTINCT p.name, r.manifest_digest FROM manifest_references r "
            "JOIN repositories p ON p.id = r.repository_id WHERE NOT EXISTS "
            "(SELECT 1 FROM manifests m WHERE m.repository_id = r.repository_id "
            "AND m.digest = r.manifest_digest)"
        ).fetchall()

    def drop_orphan_references(self, conn: Conn) -> list[str]:
        """Delete them; returns the blob digests whose counters must be recounted."""
        rows = conn.execute(
            "DELETE FROM manifest_references WHERE NOT EXISTS (SELECT 1 FROM manifests m "
            "WHERE m.repository_id = manifest_references.repository_id "
            "AND m.digest = manifest_references.manifest_digest) RETURNING target_digest"
        ).fetchall()
        return sorted({row[0] for row in rows})

    def dangling_tags(self, conn: Conn) -> list[tuple[str, str, str]]:
        """(repository, tag, digest) of tags that name no manifest of their repository."""
        return conn.execute(
            "SELECT p.name, t.name, t.manifest_digest FROM tags t "
            "JOIN repositories p ON p.id = t.repository_id WHERE NOT EXISTS "
            "(SELECT 1 FROM manifests m WHERE m.repository_id = t.repository_id "
            "AND m.digest = t.manifest_digest)"
        ).fetchall()

    def drop_tag(self, conn: Conn, repository: str, tag: str) -> None:
        conn.execute(
            "DELETE FROM tags WHERE name = ? "
            "AND repository_id = (SELECT id FROM repositories WHERE name = ?)",
            (tag, repository),
        )

    def manifests_without_bytes(self, conn: Conn) -> list[tuple[str, str]]:
        return conn.execute(
            "SELECT p.name, m.digest FROM manifests m JOIN repositories p ON p.id = m.repository_id "
            "WHERE NOT EXISTS (SELECT 1 FROM manifest_content c WHERE c.digest = m.digest)"
        ).fetchall()

    def content_count_drift(self, conn: Conn) -> list[tuple[str, int, int]]:
        rows = conn.execute(
            "SELECT c.digest, c.repo_count, (SELECT COUNT(*) FROM manifests m WHERE m.digest = c.digest) "
            "FROM manifest_content c"
        ).fetchall()
        return [row for row in rows if row[1] != row[2]]

    def recount_content(self, conn: Conn, digests: list[str]) -> None:
        conn.executemany(
            "UPDATE manifest_content SET repo_count = (SELECT COUNT(*) FROM manifests m "
            "WHERE m.digest = manifest_content.digest) WHERE digest = ?",
            ((digest,) for digest in digests),
        )
        conn.execute("DELETE FROM manifest_content WHERE repo_count = 0")

    def expired_uploads(self, conn: Conn, now: float) -> list[tuple[str, str]]:
        return conn.execute(
            "SELECT u.id, p.name FROM uploads u JOIN repositories p ON p.id = u.repository_id "
            "WHERE u.expires_at < ?",
            (now,),
        ).fetchall()

    def stuck_tombstones(self, conn: Conn) -> list[tuple[str, str]]:
        """Tombstoned blobs whose copy is not queued for deletion (nothing would ever remove them)."""
        return conn.execute(
            "SELECT b.digest, b.storage_key FROM blobs b WHERE b.state = 'deleting' AND NOT EXISTS "
            "(SELECT 1 FROM doomed_objects d WHERE d.storage_key = b.storage_key)"
        ).fetchall()

    def queue_for_deletion(self, conn: Conn, items: list[tuple[str, str | None]], now: float) -> None:
        conn.executemany(
            "INSERT OR IGNORE INTO doomed_objects (storage_key, digest, queued_at) VALUES (?, ?, ?)",
            ((key, digest, now) for key, digest in items),
        )
