"""The SQLite schema, built and evolved by numbered migrations (sqlite-utils).

::

    repositories (id, name UNIQUE, created_at)
        │
        ├── repository_blobs (digest, repository_id, linked_at)      which blobs a repository may serve
        │        └──► blobs (digest PK, storage_key, size, state, checksum,
        │                    created_at, touched_at, manifest_refs, repo_links)
        │                    one row per digest (in digest order): global dedup; 'live' or 'quarantined'
        ├── manifests (repository_id, digest, media_type, artifact_type, subject,
        │              annotations, size, created_at, last_pulled_at)
        │        ├──► manifest_content (digest PK, data, repo_count)  the exact bytes, shared
        │        └── manifest_references (repository_id, manifest_digest, target_digest, kind)
        │                    kind 'blob' (config, layers) or 'manifest' (index children)
        ├── tags (repository_id, name, manifest_digest, created_at, updated_at, last_pulled_at)
        └── uploads (id PK, repository_id, algorithm, size, storage_key, staged_state, hash_state,
                     created_at, updated_at, expires_at)
                     size, staged_state (the backend's token) and hash_state (the running digest)
                     change together, in the transaction that acknowledges a chunk

    doomed_objects (storage_key PK, digest, size, queued_at)   physical copies waiting to be deleted
    doomed_pages (id, queued_at, copies)    the same, one row per GC sweep page: copies is a JSON
                                            list of [storage_key, size]
    leases (name PK, owner, expires_at)                   one runner of a job across processes/nodes
    job_runs (id, kind, dry_run, status, started_at, finished_at, summary)   GC/retention reports
    admin_settings (name PK, value, updated_at)          set through the admin API, e.g. retention policies
    events (id AUTOINCREMENT, created_at, action, repository, digest, tag, media_type,
            artifact_type, subject, detail)   the outbox, written in the same transaction as the change
    event_cursors (consumer PK, last_id, updated_at)     how far each consumer has read
    replication_jobs (id, rule, repository, kind, name, state, attempts, next_attempt_at, owner,
                      lease_expires_at, progress, last_error, ...)   durable replication work
    replication_stats (rule PK, bytes_sent, bytes_skipped, ...)       per-rule counters
    replication_blobs (target, digest, repository)       where a digest was sent (cross-repo mounts)
    identities (name PK, kind 'user'|'robot', secret_hash, admin, description, created_at, expires_at)
    audit_log (id, at, actor, address, action, repository, detail)   who did what, from where, when
    webhook_deliveries (id, endpoint, event_id, attempt, outcome, status_code, error, at)   every attempt
    quota_usage (id, pattern UNIQUE, bytes, objects, limit_bytes, warn_bytes, warned, counted_at)
                     one row per quota namespace (a repository glob): its deduplicated usage
    quota_objects (quota_id, digest, links, size)   each digest linked into a namespace, once

Refcounts: ``blobs.manifest_refs`` = rows of manifest_references (kind 'blob') naming the
digest, in any repository; ``blobs.repo_links`` = rows of repository_blobs. Both change
in the same transaction as the rows they count. ``manifest_content.repo_count`` = rows of
manifests with that digest. ``quota_objects.links`` = rows of repository_blobs and manifests
naming the digest in the namespace's repositories; ``quota_usage.bytes`` = the sum of its
quota_objects sizes (likewise kept in the same transactions).

Migrations run in one ``BEGIN IMMEDIATE`` transaction, so several worker processes that
start together apply each one exactly once.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils

Migration = Callable[["sqlite_utils.Database"], None]


def _v1_initial(db: sqlite_utils.Database) -> None:
    db.create_table(
        "repositories",
        {"id": int, "name": str, "created_at": float},
        pk="id",
        not_null={"name", "created_at"},
    )
    db["repositories"].create_index(["name"], unique=True)

    db.create_table(
        "blobs",
        {
            "digest": str,
            "storage_key": str,
            "size": int,
            "state": str,
            "checksum": str,
            "created_at": float,
            "touched_at": float,
            "manifest_refs": int,
            "repo_links": int,
        },
        pk="digest",
        not_null={"storage_key", "size", "state", "created_at", "touched_at", "manifest_refs", "repo_links"},
        defaults={"manifest_refs": 0, "repo_links": 0, "state": "live"},
    )
    db["blobs"].create_index(["state", "touched_at"])

    db.create_table(
        "repository_blobs",
        {"repository_id": int, "digest": str, "linked_at": float},
        pk=("repository_id", "digest"),
        not_null={"linked_at"},
    )
    db["repository_blobs"].create_index(["digest"])

    db.create_table(
        "manifest_content",
        {"digest": str, "data": bytes, "repo_count": int},
        pk="digest",
        not_null={"data", "repo_count"},
        defaults={"repo_count": 0},
    )
    db.create_table(
        "manifests",
        {
            "repository_id": int,
            "digest": str,
            "media_type": str,
            "artifact_type": str,
            "subject": str,
            "annotations": str,
            "size": int,
            "created_at": float,
            "last_pulled_at": float,
        },
        pk=("repository_id", "digest"),
        not_null={"media_type", "size", "created_at"},
    )
    db["manifests"].create_index(["repository_id", "subject"])
    db["manifests"].create_index(["digest"])

    db.create_table(
        "manifest_references",
        {"repository_id": int, "manifest_digest": str, "target_digest": str, "kind": str},
        pk=("repository_id", "manifest_digest", "target_digest", "kind"),
    )
    db["manifest_references"].create_index(["repository_id", "target_digest"])
    db["manifest_references"].create_index(["target_digest", "kind"])

    db.create_table(
        "tags",
        {
            "repository_id": int,
            "name": str,
            "manifest_digest": str,
            "created_at": float,
            "updated_at": float,
            "last_pulled_at": float,
        },
        pk=("repository_id", "name"),
        not_null={"manifest_digest", "created_at", "updated_at"},
    )
    db["tags"].create_index(["repository_id", "manifest_digest"])

    db.create_table(
        "uploads",
        {
            "id": str,
            "repository_id": int,
            "algorithm": str,
            "size": int,
            "created_at": float,
            "updated_at": float,
            "expires_at": float,
        },
        pk="id",
        not_null={"repository_id", "algorithm", "size", "created_at", "updated_at", "expires_at"},
        defaults={"size": 0},
    )
    db["uploads"].create_index(["expires_at"])

    db.create_table(
        "doomed_objects",
        {"storage_key": str, "digest": str, "queued_at": float},
        pk="storage_key",
        not_null={"queued_at"},
    )


def _v2_portable_uploads(db: sqlite_utils.Database) -> None:
    """Uploads remember their final key, the backend's staged-upload token and the hash state."""
    uploads = db["uploads"]
    uploads.add_column("storage_key", str)
    uploads.add_column("staged_state", str)
    uploads.add_column("hash_state", bytes)
    uploads.create_index(["storage_key"], unique=True)


def _v3_collection(db: sqlite_utils.Database) -> None:
    """What the garbage collector and the schedulers need: key lookups, leases, run reports."""
    db["blobs"].create_index(["storage_key"])
    db["blobs"].create_index(["manifest_refs", "touched_at"])
    db.create_table(
        "leases",
        {"name": str, "owner": str, "expires_at": float},
        pk="name",
        not_null={"owner", "expires_at"},
    )
    db.create_table(
        "job_runs",
        {
            "id": int,
            "kind": str,
            "dry_run": int,
            "status": str,
            "started_at": float,
            "finished_at": float,
            "summary": str,
        },
        pk="id",
        not_null={"kind", "dry_run", "status", "started_at"},
    )
    db["job_runs"].create_index(["kind", "started_at"])


def _v4_admin_settings(db: sqlite_utils.Database) -> None:
    """Settings an admin changed through the API (retention policies); they override the file's."""
    db.create_table(
        "admin_settings",
        {"name": str, "value": str, "updated_at": float},
        pk="name",
        not_null={"value", "updated_at"},
    )


def _v5_events(db: sqlite_utils.Database) -> None:
    """The outbox: one row per change, written in the change's own transaction; consumer cursors."""
    # AUTOINCREMENT: an id is never reused after pruning, so a consumer's cursor stays meaningful.
    db.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL, "
        "action TEXT NOT NULL, repository TEXT NOT NULL, digest TEXT, tag TEXT, media_type TEXT, "
        "artifact_type TEXT, subject TEXT)"
    )
    db.execute("CREATE INDEX events_created_at ON events (created_at)")
    db.create_table(
        "event_cursors",
        {"consumer": str, "last_id": int, "updated_at": float},
        pk="consumer",
        not_null={"last_id", "updated_at"},
    )


def _v6_replication(db: sqlite_utils.Database) -> None:
    """Replication: durable jobs (one per object to bring in line), per-rule counters, and
    where each digest was last sent on each target (for cross-repository mounts)."""
    db.execute(
        "CREATE TABLE replication_jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, rule TEXT NOT NULL, "
        "repository TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, digest TEXT, event_id INTEGER, "
        "created_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending', "
        "attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, owner TEXT, "
        "lease_expires_at REAL, progress TEXT, last_error TEXT, "
        "bytes_sent INTEGER NOT NULL DEFAULT 0, bytes_skipped INTEGER NOT NULL DEFAULT 0, "
        "updated_at REAL NOT NULL, finished_at REAL)"
    )
    # At most one pending job per object: a burst of events for one tag is one job.
    db.execute(
        "CREATE UNIQUE INDEX replication_jobs_pending ON replication_jobs (rule, repository, kind, name) "
        "WHERE state = 'pending'"
    )
    db.execute("CREATE INDEX replication_jobs_state ON replication_jobs (state, next_attempt_at)")
    db.execute("CREATE INDEX replication_jobs_rule ON replication_jobs (rule, state, created_at)")
    db.create_table(
        "replication_stats",
        {
            "rule": str,
            "direction": str,
            "target": str,
            "bytes_sent": int,
            "bytes_skipped": int,
            "blobs_sent": int,
            "blobs_skipped": int,
            "manifests_sent": int,
            "tags_moved": int,
            "failures": int,
            "last_success_at": float,
            "last_error": str,
            "last_error_at": float,
        },
        pk="rule",
        defaults={
            "bytes_sent": 0,
            "bytes_skipped": 0,
            "blobs_sent": 0,
            "blobs_skipped": 0,
            "manifests_sent": 0,
            "tags_moved": 0,
            "failures": 0,
        },
    )
    db.create_table(
        "replication_blobs",
        {"target": str, "digest": str, "repository": str, "recorded_at": float},
        pk=("target", "digest"),
        not_null={"repository", "recorded_at"},
    )


def _v7_access_control(db: sqlite_utils.Database) -> None:
    db.create_table(
        "identities",
        {
            "name": str,
            "kind": str,
            "secret_hash": str,
            "admin": int,
            "description": str,
            "created_at": float,
            "expires_at": float,
        },
        pk="name",
        not_null={"kind", "secret_hash", "admin", "created_at"},
        defaults={"admin": 0, "description": ""},
    )
    db.create_table(
        "audit_log",
        {
            "id": int,
            "at": float,
            "actor": str,
            "address": str,
            "action": str,
            "repository": str,
            "detail": str,
        },
        pk="id",
        not_null={"at", "actor", "action"},
    )
    db.execute("CREATE INDEX audit_log_at ON audit_log (at)")
    db.execute("CREATE INDEX audit_log_actor ON audit_log (actor, at)")


def _v8_webhooks(db: sqlite_utils.Database) -> None:
    """The webhook delivery log: one row per attempt at delivering an event to an endpoint."""
    db.execute(
        "CREATE TABLE webhook_deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT, endpoint TEXT NOT NULL, "
        "event_id INTEGER NOT NULL, attempt INTEGER NOT NULL, outcome TEXT NOT NULL, status_code INTEGER, "
        "error TEXT, duration_ms REAL, at REAL NOT NULL)"
    )
    db.execute("CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint, event_id)")
    db.execute("CREATE INDEX webhook_deliveries_at ON webhook_deliveries (at)")


def _v9_collection_order(db: sqlite_utils.Database) -> None:
    """The GC's mark walks unreferenced live blobs in digest order without sorting them all."""
    db.execute("CREATE INDEX blobs_collectible ON blobs (manifest_refs, state, digest)")


def _v10_quotas(db: sqlite_utils.Database) -> None:
    """Storage quotas counted with dedup: per namespace (a repository glob), each distinct blob or
    manifest digest linked into any of its repositories once, kept up to date in the same
    transactions as repository_blobs and manifests; and events may carry a JSON detail."""
    db.execute(
        "CREATE TABLE quota_usage (id INTEGER PRIMARY KEY, pattern TEXT NOT NULL UNIQUE, "
        "bytes INTEGER NOT NULL DEFAULT 0, objects INTEGER NOT NULL DEFAULT 0, "
        "limit_bytes INTEGER NOT NULL, warn_bytes INTEGER NOT NULL, warned INTEGER NOT NULL DEFAULT 0, "
        "counted_at REAL NOT NULL)"
    )
    # links: rows of repository_blobs and manifests in the namespace naming the digest.
    db.execute(
        "CREATE TABLE quota_objects (quota_id INTEGER NOT NULL, digest TEXT NOT NULL, "
        "links INTEGER NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (quota_id, digest)) WITHOUT ROWID"
    )
    db.execute("CREATE INDEX quota_objects_digest ON quota_objects (digest)")
    db.execute("ALTER TABLE events ADD COLUMN detail TEXT")


def _v11_digest_ordered_blobs(db: sqlite_utils.Database) -> None:
    """Blob rows and repository links stored in digest order (WITHOUT ROWID), so the GC's
    digest-ordered sweep rewrites neighbouring pages instead of most of the file. Indexes in
    random order cost a sweep most of its writes: the two ``touched_at`` ones (unused) and the
    one on ``storage_key`` go (the leak scan walks keys in order instead of looking them up).
    A swept blob's row now goes in the sweep's own transaction, so the deletion queue keeps
    each copy's size; rows tombstoned by an older version move into the queue now."""
    db.execute(
        "INSERT OR IGNORE INTO doomed_objects (storage_key, digest, queued_at) "
        "SELECT storage_key, digest, ? FROM blobs WHERE state = 'deleting'",
        (time.time(),),
    )
    db.execute("ALTER TABLE doomed_objects ADD COLUMN size INTEGER")
    db.execute(
        "UPDATE doomed_objects SET size = (SELECT b.size FROM blobs b WHERE b.storage_key = "
        "doomed_objects.storage_key AND b.state = 'deleting')"
    )
    db.execute(
        "CREATE TABLE blobs_v11 (digest TEXT PRIMARY KEY, storage_key TEXT NOT NULL, "
        "size INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'live', checksum TEXT, "
        "created_at REAL NOT NULL, touched_at REAL NOT NULL, manifest_refs INTEGER NOT NULL DEFAULT 0, "
        "repo_links INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID"
    )
    db.execute(
        "INSERT INTO blobs_v11 SELECT digest, storage_key, size, state, checksum, created_at, touched_at, "
        "manifest_refs, repo_links FROM blobs WHERE state != 'deleting' ORDER BY digest"
    )
    db.execute("DROP TABLE blobs")
    db.execute("ALTER TABLE blobs_v11 RENAME TO blobs")
    db.execute("CREATE INDEX blobs_collectible ON blobs (manifest_refs, state, digest)")
    # (digest, repository_id): "may repository R serve D" is still one key lookup.
    db.execute(
        "CREATE TABLE repository_blobs_v11 (repository_id INTEGER NOT NULL, digest TEXT NOT NULL, "
        "linked_at REAL NOT NULL, PRIMARY KEY (digest, repository_id)) WITHOUT ROWID"
    )
    db.execute(
        "INSERT INTO repository_blobs_v11 SELECT repository_id, digest, linked_at FROM repository_blobs "
        "ORDER BY digest, repository_id"
    )
    db.execute("DROP TABLE repository_blobs")
    db.execute("ALTER TABLE repository_blobs_v11 RENAME TO repository_blobs")


def _v12_lean_collection_indexes(db: sqlite_utils.Database) -> None:
    """The GC's candidate index holds only unreferenced live blobs (a partial index), so a
    manifest push that adds a reference to a blob some manifest already references no longer
    rewrites an index entry; and the deletion queue is one b-tree keyed by storage key
    (WITHOUT ROWID), so queueing and forgetting a copy each touch one b-tree, not two."""
    db.execute("DROP INDEX blobs_collectible")
    db.execute("CREATE INDEX blobs_collectible ON blobs (digest) WHERE manifest_refs = 0 AND state = 'live'")
    db.execute(
        "CREATE TABLE doomed_objects_v12 (storage_key TEXT PRIMARY KEY, digest TEXT, "
        "queued_at REAL NOT NULL, size INTEGER) WITHOUT ROWID"
    )
    db.execute(
        "INSERT INTO doomed_objects_v12 SELECT storage_key, digest, queued_at, size FROM doomed_objects "
        "ORDER BY storage_key"
    )
    db.execute("DROP TABLE doomed_objects")
    db.execute("ALTER TABLE doomed_objects_v12 RENAME TO doomed_objects")


def _v13_paged_deletion_queue(db: sqlite_utils.Database) -> None:
    """A GC sweep queues each page's copies as one row instead of a row per copy: the
    inserts and deletes of those rows were a fifth of a sweep's SQL. Single copies (a
    replaced upload, a leak fsck found, a copy whose delete failed) stay in doomed_objects."""
    db.execute(
        "CREATE TABLE doomed_pages (id INTEGER PRIMARY KEY, queued_at REAL NOT NULL, copies TEXT NOT NULL)"
    )


MIGRATIONS: list[Migration] = [
    _v1_initial,
    _v2_portable_uploads,
    _v3_collection,
    _v4_admin_settings,
    _v5_events,
    _v6_replication,
    _v7_access_control,
    _v8_webhooks,
    _v9_collection_order,
    _v10_quotas,
    _v11_digest_ordered_blobs,
    _v12_lean_collection_indexes,
    _v13_paged_deletion_queue,
]
"""Append only. Migration N (1-based) is ``MIGRATIONS[N - 1]``; never edit a released one."""


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version; returns the version. Safe to race.
    (sqlite-utils is imported only when a migration is due: every CLI command opens the store.)"""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)"
        )
        current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
        if current < len(MIGRATIONS):
            import sqlite_utils

            db = sqlite_utils.Database(conn)
            for version in range(current + 1, len(MIGRATIONS) + 1):
                MIGRATIONS[version - 1](db)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(MIGRATIONS)
