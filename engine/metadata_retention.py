"""SQL for retention: a repository's manifests, tags and index edges, the blob references
that say what deleting manifests would free, and the re-checks of compare-and-delete.

Part of the metadata layer (all SQL lives in ``metadata*.py`` and the migrations); the
engine's ``inventory`` module turns these rows into its read model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from cargohold.engine.metadata import Conn, MetadataStore


def _marks(items: Sequence[object]) -> str:
    return ",".join("?" * len(items))


class RetentionQueries:
    """The statements retention runs, on the registry's metadata store."""

    def __init__(self, store: MetadataStore) -> None:
        self.store = store

    @contextmanager
    def snapshot(self) -> Iterator[Conn]:
        """One read transaction: every query in the block sees the same state (WAL snapshot)."""
        conn = self.store.read()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    # -- the read model ---------------------------------------------------------------------
    def repositories(self, conn: Conn) -> list[tuple[int, str]]:
        """(id, name) of every repository holding a manifest, by name."""
        rows = conn.execute(
            "SELECT r.id, r.name FROM repositories r "
            "WHERE EXISTS (SELECT 1 FROM manifests m WHERE m.repository_id = r.id) ORDER BY r.name"
        )
        return [(row[0], row[1]) for row in rows]

    def manifests(
        self, conn: Conn, repository_id: int
    ) -> list[tuple[str, str, str | None, str | None, float, float | None]]:
        """(digest, media_type, artifact_type, subject, created_at, last_pulled_at)."""
        rows = conn.execute(
            "SELECT digest, media_type, artifact_type, subject, created_at, last_pulled_at "
            "FROM manifests WHERE repository_id = ?",
            (repository_id,),
        )
        return [tuple(row) for row in rows]

    def tags(self, conn: Conn, repository_id: int) -> list[tuple[str, str, float, float | None]]:
        """(manifest digest, tag, updated_at, last_pulled_at)."""
        rows = conn.execute(
            "SELECT manifest_digest, name, updated_at, last_pulled_at FROM tags WHERE repository_id = ? "
            "ORDER BY name",
            (repository_id,),
        )
        return [tuple(row) for row in rows]

    def index_edges(self, conn: Conn, repository_id: int) -> list[tuple[str, str]]:
        """(index, child) for every manifest an index of the repository lists."""
        rows = conn.execute(
            "SELECT manifest_digest, target_digest FROM manifest_references "
            "WHERE repository_id = ? AND kind = 'manifest'",
            (repository_id,),
        )
        return [(row[0], row[1]) for row in rows]

    def blob_references(
        self, conn: Conn, repository_id: int, digests: Sequence[str]
    ) -> list[tuple[str, str, int, int]]:
        """(manifest, blob, size, manifest_refs) for the live blobs the manifests reference."""
        found: list[tuple[str, str, int, int]] = []
        for start in range(0, len(digests), 500):
            part = digests[start : start + 500]
            rows = conn.execute(
                "SELECT r.manifest_digest, b.digest, b.size, b.manifest_refs FROM manifest_references r "
                "JOIN blobs b ON b.digest = r.target_digest AND b.state = 'live' "
                f"WHERE r.repository_id = ? AND r.kind = 'blob' AND r.manifest_digest IN ({_marks(part)})",
                (repository_id, *part),
            )
            found.extend((row[0], row[1], row[2], row[3]) for row in rows)
        return found

    # -- re-checks before deleting (in the caller's write transaction) ---------------------------
    def manifest_tags(self, conn: Conn, repository_id: int, digest: str) -> set[str]:
        rows = conn.execute(
            "SELECT name FROM tags WHERE repository_id = ? AND manifest_digest = ?", (repository_id, digest)
        )
        return {row[0] for row in rows}

    def is_listed(self, conn: Conn, repository_id: int, digest: str) -> bool:
        """Whether an index of the repository lists the manifest."""
        row = conn.execute(
            "SELECT 1 FROM manifest_references WHERE repository_id = ? AND target_digest = ? "
            "AND kind = 'manifest' LIMIT 1",
            (repository_id, digest),
        ).fetchone()
        return row is not None

    def delete_tag_of(self, conn: Conn, repository_id: int, tag: str, digest: str) -> bool:
        """Delete the tag only while it still names ``digest`` (a re-pushed tag stays)."""
        cur = conn.execute(
            "DELETE FROM tags WHERE repository_id = ? AND name = ? AND manifest_digest = ?",
            (repository_id, tag, digest),
        )
        return cur.rowcount == 1
