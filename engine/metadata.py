"""The metadata store: every SQL statement of the registry lives here.

SQLite in WAL mode, one connection per thread, a busy timeout so several worker
processes can share the file. Writes that must agree run in one ``BEGIN IMMEDIATE``
transaction (``store.write()``): a deferred transaction that reads and then writes can
fail under WAL, an immediate one waits for the write lock up front. The schema and its
migrations are in ``schema.py``. Keeping the SQL here (and out of the engine's logic)
is what lets a PostgreSQL store be added later without touching the API.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cargohold.engine.errors import StorageUnavailable
from cargohold.engine.metadata_quotas import QuotaQueries
from cargohold.engine.readahead import ReadAhead
from cargohold.engine.schema import migrate

Conn = sqlite3.Connection
BUSY_TIMEOUT_MS = 15_000


@dataclass(frozen=True, slots=True)
class BlobRow:
    digest: str
    storage_key: str
    size: int
    state: str


@dataclass(frozen=True, slots=True)
class UploadRow:
    id: str
    repository: str
    repository_id: int
    algorithm: str
    size: int
    expires_at: float
    storage_key: str
    staged_state: str
    hash_state: bytes | None


@dataclass(frozen=True, slots=True)
class ManifestRow:
    digest: str
    media_type: str
    size: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class ReferrerRow:
    digest: str
    media_type: str
    size: int
    artifact_type: str | None
    annotations: str | None


@dataclass(frozen=True, slots=True)
class NewManifest:
    digest: str
    media_type: str
    artifact_type: str | None
    subject: str | None
    annotations: str | None
    data: bytes
    blob_refs: Sequence[str]
    manifest_refs: Sequence[str]


class MetadataStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # Quota namespaces' usage follows every link and manifest row change (metadata_quotas).
        self.quota_counts = QuotaQueries()
        self.schema_version = migrate(self._conn())

    # -- connections and transactions --------------------------------------------------
    def _conn(self) -> Conn:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=15)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: an acknowledged push survives a power loss, not only a process crash.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = OFF")
            self._local.conn = conn
        return conn

    @contextmanager
    def write(self, durable: bool = True) -> Iterator[Conn]:
        """One immediate transaction; rolled back on any exception.

        ``durable=False`` skips the fsync of this commit (it survives a crash of the process,
        not a power loss): only for bookkeeping that the next run redoes if it is lost, such
        as forgetting copies that are already deleted.
        """
        conn = self._conn()
        if not durable:
            conn.execute("PRAGMA synchronous = NORMAL")
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StorageUnavailable(f"metadata store busy: {exc}") from exc
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous = FULL")

    def read(self) -> Conn:
        return self._conn()

    def data_version(self) -> int:
        """Changes whenever another connection commits (not this thread's own commits): a
        cheap way for background work to notice that requests are writing."""
        return int(self._conn().execute("PRAGMA data_version").fetchone()[0])

    def check(self) -> None:
        try:
            self._conn().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"metadata store unavailable: {exc}") from exc

    def read_ahead(self) -> ReadAhead | None:
        """Start reading the database file into the page cache in the background (before a
        job that touches most of its pages; see ``readahead``)."""
        return ReadAhead.start(self.path)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- repositories ------------------------------------------------------------------
    def repository_id(self, conn: Conn, name: str) -> int | None:
        row = conn.execute("SELECT id FROM repositories WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def ensure_repository(self, conn: Conn, name: str) -> int:
        repo_id = self.repository_id(conn, name)
        if repo_id is None:
            cur = conn.execute(
                "INSERT INTO repositories (name, created_at) VALUES (?, ?)", (name, time.time())
            )
            repo_id = int(cur.lastrowid or 0)
        return repo_id

    def catalog(self, conn: Conn, last: str, limit: int) -> list[str]:
        rows = conn.execute(
            "SELECT name FROM repositories r WHERE name > ? "
            "AND EXISTS (SELECT 1 FROM manifests m WHERE m.repository_id = r.id) "
            "ORDER BY name LIMIT ?",
            (last, limit),
        )
        return [row[0] for row in rows]

    # -- blobs -------------------------------------------------------------------------
    def blob(self, conn: Conn, digest: str) -> BlobRow | None:
        row = conn.execute(
            "SELECT digest, storage_key, size, state FROM blobs WHERE digest = ?", (digest,)
        ).fetchone()
        return BlobRow(*row) if row else None

    def linked_blob(self, conn: Conn, repository: str, digest: str) -> BlobRow | None:
        """The live blob ``digest`` if ``repository`` may serve it."""
        row = conn.execute(
            "SELECT b.digest, b.storage_key, b.size, b.state FROM repositories r "
            "JOIN repository_blobs rb ON rb.repository_id = r.id AND rb.digest = ? "
            "JOIN blobs b ON b.digest = rb.digest AND b.state = 'live' "
            "WHERE r.name = ?",
            (digest, repository),
        ).fetchone()
        return BlobRow(*row) if row else None

    def repositories_linking(self, conn: Conn, digest: str, limit: int = 100) -> list[str]:
        rows = conn.execute(
            "SELECT r.name FROM repository_blobs rb JOIN repositories r ON r.id = rb.repository_id "
            "WHERE rb.digest = ? LIMIT ?",
            (digest, limit),
        )
        return [row[0] for row in rows]

    def link_blob(self, conn: Conn, repository_id: int, digest: str, now: float) -> None:
        cur = conn.execute(
            "INSERT OR IGNORE INTO repository_blobs (repository_id, digest, linked_at) VALUES (?, ?, ?)",
            (repository_id, digest, now),
        )
        if cur.rowcount:
            conn.execute("UPDATE blobs SET repo_links = repo_links + 1 WHERE digest = ?", (digest,))
            self.quota_counts.linked(conn, repository_id, digest)
        conn.execute("UPDATE blobs SET touched_at = ? WHERE digest = ?", (now, digest))

    def unlink_blob(self, conn: Conn, repository_id: int, digest: str) -> bool:
        cur = conn.execute(
            "DELETE FROM repository_blobs WHERE repository_id = ? AND digest = ?", (repository_id, digest)
        )
        if cur.rowcount:
            conn.execute("UPDATE blobs SET repo_links = repo_links - 1 WHERE digest = ?", (digest,))
            self.quota_counts.unlinked(conn, [(repository_id, digest)])
        return bool(cur.rowcount)

    def store_blob(
        self, conn: Conn, digest: str, storage_key: str, size: int, checksum: str | None, now: float
    ) -> str | None:
        """Record a verified copy as the live blob. Returns the key of a copy made redundant.

        If another copy of the digest is already live, ours is redundant (returned, for
        the caller to delete). If the digest is being deleted (tombstoned), our copy
        revives it: the old copy's key is already queued in doomed_objects, and since every
        copy has its own key, deleting it can never touch ours. A quarantined (corrupt)
        copy is queued for deletion when ours replaces it.
        """
        existing = self.blob(conn, digest)
        if existing is not None and existing.state == "live":
            return storage_key
        if existing is not None and existing.state == "quarantined":
            # A healthy copy replaces a corrupt one: the corrupt copy can go now.
            self.queue_object_deletion(conn, existing.storage_key, digest, now, existing.size)
        if existing is None:
            # Counted, not 0: a pull-through cache stores manifests before their blobs, so
            # references may already name a digest that arrives only now.
            conn.execute(
                "INSERT INTO blobs (digest, storage_key, size, state, checksum, created_at, touched_at, "
                "manifest_refs) VALUES (?, ?, ?, 'live', ?, ?, ?, (SELECT COUNT(*) FROM manifest_references "
                "WHERE target_digest = ? AND kind = 'blob'))",
                (digest, storage_key, size, checksum, now, now, digest),
            )
        else:
            conn.execute(
                "UPDATE blobs SET storage_key = ?, size = ?, state = 'live', checksum = ?, "
                "created_at = ?, touched_at = ? WHERE digest = ?",
                (storage_key, size, checksum, now, now, digest),
            )
        return None

    def touch_blobs(self, conn: Conn, touches: Iterable[tuple[float, str]]) -> None:
        conn.executemany("UPDATE blobs SET touched_at = MAX(touched_at, ?) WHERE digest = ?", touches)

    def queue_object_deletion(
        self, conn: Conn, storage_key: str, digest: str | None, now: float, size: int | None = None
    ) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO doomed_objects (storage_key, digest, size, queued_at) VALUES (?, ?, ?, ?)",
            (storage_key, digest, size, now),
        )

    def forget_doomed(self, conn: Conn, keys: Iterable[str]) -> None:
        conn.executemany("DELETE FROM doomed_objects WHERE storage_key = ?", ((k,) for k in keys))

    def doomed_objects(self, conn: Conn, limit: int = 1000) -> list[str]:
        rows = conn.execute("SELECT storage_key FROM doomed_objects ORDER BY queued_at LIMIT ?", (limit,))
        return [row[0] for row in rows]

    # -- upload sessions ---------------------------------------------------------------
    def create_upload(
        self,
        conn: Conn,
        upload_id: str,
        repository_id: int,
        algorithm: str,
        storage_key: str,
        staged_state: str,
        now: float,
        expires_at: float,
    ) -> None:
        conn.execute(
            "INSERT INTO uploads (id, repository_id, algorithm, size, storage_key, staged_state, "
            "created_at, updated_at, expires_at) VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?)",
            (upload_id, repository_id, algorithm, storage_key, staged_state, now, now, expires_at),
        )

    def upload(self, conn: Conn, upload_id: str) -> UploadRow | None:
        row = conn.execute(
            "SELECT u.id, r.name, u.repository_id, u.algorithm, u.size, u.expires_at, "
            "u.storage_key, u.staged_state, u.hash_state "
            "FROM uploads u JOIN repositories r ON r.id = u.repository_id WHERE u.id = ?",
            (upload_id,),
        ).fetchone()
        return UploadRow(*row) if row else None

    def advance_upload(
        self,
        conn: Conn,
        row: UploadRow,
        new_size: int,
        staged_state: str,
        hash_state: bytes,
        now: float,
        expires_at: float,
    ) -> bool:
        """Acknowledge a chunk: compare-and-set on the size; False if another request moved it."""
        cur = conn.execute(
            "UPDATE uploads SET size = ?, staged_state = ?, hash_state = ?, updated_at = ?, expires_at = ? "
            "WHERE id = ? AND size = ? AND staged_state = ?",
            (new_size, staged_state, hash_state, now, expires_at, row.id, row.size, row.staged_state),
        )
        return cur.rowcount == 1

    def delete_upload(self, conn: Conn, upload_id: str) -> bool:
        return conn.execute("DELETE FROM uploads WHERE id = ?", (upload_id,)).rowcount == 1

    def expired_uploads(self, conn: Conn, now: float, limit: int = 1000) -> list[tuple[str, str]]:
        """(id, storage_key) of sessions past their expiry."""
        rows = conn.execute("SELECT id, storage_key FROM uploads WHERE expires_at < ? LIMIT ?", (now, limit))
        return [(row[0], row[1]) for row in rows]

    def upload_keys(self, conn: Conn, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` belong to an upload session that still exists."""
        found: set[str] = set()
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            sql = f"SELECT storage_key FROM uploads WHERE storage_key IN ({marks})"
            found.update(r[0] for r in conn.execute(sql, part))
        return found

    # -- manifests ---------------------------------------------------------------------
    def resolve_tag(self, conn: Conn, repository: str, tag: str) -> str | None:
        row = conn.execute(
            "SELECT t.manifest_digest FROM repositories r JOIN tags t ON t.repository_id = r.id "
            "WHERE r.name = ? AND t.name = ?",
            (repository, tag),
        ).fetchone()
        return row[0] if row else None

    def manifest(self, conn: Conn, repository: str, digest: str, with_data: bool) -> ManifestRow | None:
        data_col = "c.data" if with_data else "NULL"
        row = conn.execute(
            f"SELECT m.digest, m.media_type, m.size, {data_col} FROM repositories r "
            "JOIN manifests m ON m.repository_id = r.id AND m.digest = ? "
            "JOIN manifest_content c ON c.digest = m.digest WHERE r.name = ?",
            (digest, repository),
        ).fetchone()
        return ManifestRow(*row) if row else None

    def tagged_manifest(self, conn: Conn, repository: str, tag: str, with_data: bool) -> ManifestRow | None:
        """Resolve a tag and fetch its manifest in one query (the hot path of every pull)."""
        data_col = "c.data" if with_data else "NULL"
        row = conn.execute(
            f"SELECT m.digest, m.media_type, m.size, {data_col} FROM repositories r "
            "JOIN tags t ON t.repository_id = r.id AND t.name = ? "
            "JOIN manifests m ON m.repository_id = r.id AND m.digest = t.manifest_digest "
            "JOIN manifest_content c ON c.digest = m.digest WHERE r.name = ?",
            (tag, repository),
        ).fetchone()
        return ManifestRow(*row) if row else None

    def has_manifest(self, conn: Conn, repository_id: int, digest: str) -> bool:
        return (
            conn.execute(
                "SELECT 1 FROM manifests WHERE repository_id = ? AND digest = ?", (repository_id, digest)
            ).fetchone()
            is not None
        )

    def missing_blobs(self, conn: Conn, repository_id: int, digests: Iterable[str]) -> list[str]:
        """Which of ``digests`` are not live blobs linked to the repository."""
        missing = []
        for digest in dict.fromkeys(digests):
            row = conn.execute(
                "SELECT 1 FROM repository_blobs rb JOIN blobs b ON b.digest = rb.digest "
                "WHERE rb.repository_id = ? AND rb.digest = ? AND b.state = 'live'",
                (repository_id, digest),
            ).fetchone()
            if row is None:
                missing.append(digest)
        return missing

    def missing_manifests(self, conn: Conn, repository_id: int, digests: Iterable[str]) -> list[str]:
        return [d for d in dict.fromkeys(digests) if not self.has_manifest(conn, repository_id, d)]

    def insert_manifest(self, conn: Conn, repository_id: int, m: NewManifest, now: float) -> bool:
        """Add the manifest to the repository with its references; False if it was there."""
        if self.has_manifest(conn, repository_id, m.digest):
            return False
        conn.execute(
            "INSERT INTO manifest_content (digest, data, repo_count) VALUES (?, ?, 1) "
            "ON CONFLICT (digest) DO UPDATE SET repo_count = repo_count + 1",
            (m.digest, m.data),
        )
        conn.execute(
            "INSERT INTO manifests (repository_id, digest, media_type, artifact_type, subject, annotations, "
            "size, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                repository_id,
                m.digest,
                m.media_type,
                m.artifact_type,
                m.subject,
                m.annotations,
                len(m.data),
                now,
            ),
        )
        self.quota_counts.linked(conn, repository_id, m.digest, len(m.data))
        blob_refs = list(dict.fromkeys(m.blob_refs))
        conn.executemany(
            "INSERT INTO manifest_references (repository_id, manifest_digest, target_digest, kind) "
            "VALUES (?, ?, ?, 'blob')",
            ((repository_id, m.digest, d) for d in blob_refs),
        )
        conn.executemany(
            "UPDATE blobs SET manifest_refs = manifest_refs + 1, touched_at = ? WHERE digest = ?",
            ((now, d) for d in blob_refs),
        )
        conn.executemany(
            "INSERT INTO manifest_references (repository_id, manifest_digest, target_digest, kind) "
            "VALUES (?, ?, ?, 'manifest')",
            ((repository_id, m.digest, d) for d in dict.fromkeys(m.manifest_refs)),
        )
        return True

    def delete_manifest(self, conn: Conn, repository_id: int, digest: str) -> bool:
        """Remove the manifest, its tags and its references from one repository."""
        if not self.has_manifest(conn, repository_id, digest):
            return False
        refs = [
            row[0]
            for row in conn.execute(
                "SELECT target_digest FROM manifest_references "
                "WHERE repository_id = ? AND manifest_digest = ? AND kind = 'blob'",
                (repository_id, digest),
            )
        ]
        conn.executemany(
            "UPDATE blobs SET manifest_refs = manifest_refs - 1 WHERE digest = ?", ((d,) for d in refs)
        )
        conn.execute(
            "DELETE FROM manifest_references WHERE repository_id = ? AND manifest_digest = ?",
            (repository_id, digest),
        )
        conn.execute(
            "DELETE FROM tags WHERE repository_id = ? AND manifest_digest = ?", (repository_id, digest)
        )
        conn.execute("DELETE FROM manifests WHERE repository_id = ? AND digest = ?", (repository_id, digest))
        self.quota_counts.unlinked(conn, [(repository_id, digest)])
        conn.execute("UPDATE manifest_content SET repo_count = repo_count - 1 WHERE digest = ?", (digest,))
        conn.execute("DELETE FROM manifest_content WHERE digest = ? AND repo_count <= 0", (digest,))
        return True

    def set_tag(self, conn: Conn, repository_id: int, tag: str, digest: str, now: float) -> None:
        conn.execute(
            "INSERT INTO tags (repository_id, name, manifest_digest, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (repository_id, name) DO UPDATE SET "
            "manifest_digest = excluded.manifest_digest, updated_at = excluded.updated_at "
            "WHERE tags.manifest_digest != excluded.manifest_digest",
            (repository_id, tag, digest, now, now),
        )

    def tags_reaching(self, conn: Conn, repository_id: int, digest: str) -> list[str]:
        """Tags of the repository naming the manifest, or an index that lists it (at any depth)."""
        rows = conn.execute(
            "WITH RECURSIVE up(digest) AS (SELECT ? UNION SELECT r.manifest_digest "
            "FROM manifest_references r JOIN up ON r.target_digest = up.digest "
            "WHERE r.repository_id = ? AND r.kind = 'manifest') "
            "SELECT t.name FROM tags t JOIN up ON t.manifest_digest = up.digest "
            "WHERE t.repository_id = ? ORDER BY t.name",
            (digest, repository_id, repository_id),
        )
        return [row[0] for row in rows]

    def delete_tag(self, conn: Conn, repository_id: int, tag: str) -> bool:
        cur = conn.execute("DELETE FROM tags WHERE repository_id = ? AND name = ?", (repository_id, tag))
        return cur.rowcount == 1

    def list_tags(self, conn: Conn, repository_id: int, last: str, limit: int) -> list[str]:
        rows = conn.execute(
            "SELECT name FROM tags WHERE repository_id = ? AND name > ? ORDER BY name LIMIT ?",
            (repository_id, last, limit),
        )
        return [row[0] for row in rows]

    def referrers(
        self, conn: Conn, repository_id: int, subject: str, artifact_type: str | None, last: str, limit: int
    ) -> list[ReferrerRow]:
        sql = (
            "SELECT digest, media_type, size, artifact_type, annotations FROM manifests "
            "WHERE repository_id = ? AND subject = ? AND digest > ?"
        )
        params: list[object] = [repository_id, subject, last]
        if artifact_type is not None:
            sql += " AND artifact_type = ?"
            params.append(artifact_type)
        sql += " ORDER BY digest LIMIT ?"
        params.append(limit)
        return [ReferrerRow(*row) for row in conn.execute(sql, params)]

    # -- pull activity (batched) -------------------------------------------------------
    def record_manifest_pulls(self, conn: Conn, pulls: Iterable[tuple[float, str, str]]) -> None:
        conn.executemany(
            "UPDATE manifests SET last_pulled_at = MAX(COALESCE(last_pulled_at, 0), ?) "
            "WHERE digest = ? AND repository_id = (SELECT id FROM repositories WHERE name = ?)",
            pulls,
        )

    def record_tag_pulls(self, conn: Conn, pulls: Iterable[tuple[float, str, str]]) -> None:
        conn.executemany(
            "UPDATE tags SET last_pulled_at = MAX(COALESCE(last_pulled_at, 0), ?) "
            "WHERE name = ? AND repository_id = (SELECT id FROM repositories WHERE name = ?)",
            pulls,
        )
