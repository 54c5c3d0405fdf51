"""Migrations carry existing rows forward (a store made by an older version opens intact)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import sqlite_utils

from cargohold.engine.schema import MIGRATIONS, migrate


def store_at(path: Path, version: int) -> sqlite3.Connection:
    """A metadata file as the version that knew only the first ``version`` migrations made it."""
    conn = sqlite3.connect(path, isolation_level=None)
    db = sqlite_utils.Database(conn)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
    for number, migration in enumerate(MIGRATIONS[:version], 1):
        migration(db)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (number, time.time()))
    return conn


def test_v11_keeps_live_blobs_and_links_and_queues_old_tombstones(tmp_path: Path) -> None:
    conn = store_at(tmp_path / "metadata.db", 10)
    blob = "INSERT INTO blobs (digest, storage_key, size, state, checksum, created_at, touched_at, "
    blob += "manifest_refs, repo_links) VALUES (?, ?, ?, ?, ?, 1.0, 2.0, ?, ?)"
    conn.execute(blob, ("sha256:bb", "blobs/k2", 20, "live", "x1", 1, 1))
    conn.execute(blob, ("sha256:aa", "blobs/k1", 10, "live", None, 0, 2))
    conn.execute(blob, ("sha256:cc", "blobs/k3", 30, "deleting", None, 0, 0))  # queued, not yet purged
    conn.execute(blob, ("sha256:dd", "blobs/k4", 40, "deleting", None, 0, 0))  # stuck: never queued
    conn.execute(blob, ("sha256:ee", "blobs/k5", 50, "quarantined", None, 0, 0))
    conn.execute(
        "INSERT INTO doomed_objects (storage_key, digest, queued_at) VALUES ('blobs/k3', 'sha256:cc', 5)"
    )
    conn.execute("INSERT INTO doomed_objects (storage_key, digest, queued_at) VALUES ('blobs/old', NULL, 6)")
    links = [(1, "sha256:aa", 3.0), (2, "sha256:aa", 4.0), (1, "sha256:bb", 5.0)]
    conn.executemany(
        "INSERT INTO repository_blobs (repository_id, digest, linked_at) VALUES (?, ?, ?)", links
    )

    assert migrate(conn) == len(MIGRATIONS) >= 11

    rows = conn.execute("SELECT * FROM blobs ORDER BY digest").fetchall()
    assert rows == [
        ("sha256:aa", "blobs/k1", 10, "live", None, 1.0, 2.0, 0, 2),
        ("sha256:bb", "blobs/k2", 20, "live", "x1", 1.0, 2.0, 1, 1),
        ("sha256:ee", "blobs/k5", 50, "quarantined", None, 1.0, 2.0, 0, 0),
    ]
    queued = conn.execute(
        "SELECT storage_key, digest, size FROM doomed_objects ORDER BY storage_key"
    ).fetchall()
    assert queued == [("blobs/k3", "sha256:cc", 30), ("blobs/k4", "sha256:dd", 40), ("blobs/old", None, None)]
    assert sorted(conn.execute("SELECT repository_id, digest, linked_at FROM repository_blobs")) == sorted(
        links
    )
    tables = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
    assert "WITHOUT ROWID" in tables["blobs"] and "WITHOUT ROWID" in tables["repository_blobs"]
    indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'blobs'")}
    assert indexes == {"blobs", "blobs_collectible"}


def test_v12_keeps_the_queue_and_the_gc_finds_candidates_through_the_partial_index(tmp_path: Path) -> None:
    conn = store_at(tmp_path / "metadata.db", 11)
    conn.execute(
        "INSERT INTO doomed_objects (storage_key, digest, size, queued_at) "
        "VALUES ('blobs/k1', 'sha256:aa', 7, 5)"
    )
    blob = "INSERT INTO blobs (digest, storage_key, size, state, created_at, touched_at, manifest_refs) "
    blob += "VALUES (?, ?, 1, ?, 1.0, 2.0, ?)"
    conn.execute(blob, ("sha256:01", "blobs/a", "live", 0))
    conn.execute(blob, ("sha256:02", "blobs/b", "live", 3))
    conn.execute(blob, ("sha256:03", "blobs/c", "quarantined", 0))

    assert migrate(conn) == len(MIGRATIONS)

    assert conn.execute("SELECT storage_key, digest, size, queued_at FROM doomed_objects").fetchall() == [
        ("blobs/k1", "sha256:aa", 7, 5.0)
    ]
    tables = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
    assert "WITHOUT ROWID" in tables["doomed_objects"]
    candidates = "SELECT digest FROM blobs WHERE manifest_refs = 0 AND state = 'live' AND digest > ? "
    candidates += "AND touched_at < ? ORDER BY digest LIMIT 10"
    plan = " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {candidates}", ("", 9.0)))
    assert "USING INDEX blobs_collectible" in plan and "TEMP B-TREE" not in plan
    assert conn.execute(candidates, ("", 9.0)).fetchall() == [("sha256:01",)]
    in_index = conn.execute(
        "SELECT COUNT(*) FROM blobs INDEXED BY blobs_collectible WHERE manifest_refs = 0 AND state = 'live'"
    ).fetchone()[0]
    assert in_index == 1


def test_v13_keeps_single_queue_entries_and_adds_the_page_queue(tmp_path: Path) -> None:
    conn = store_at(tmp_path / "metadata.db", 12)
    conn.execute(
        "INSERT INTO doomed_objects (storage_key, digest, size, queued_at) "
        "VALUES ('blobs/k1', 'sha256:aa', 7, 5)"
    )

    assert migrate(conn) == len(MIGRATIONS)

    assert conn.execute("SELECT storage_key, size FROM doomed_objects").fetchall() == [("blobs/k1", 7)]
    conn.execute("INSERT INTO doomed_pages (queued_at, copies) VALUES (6, '[[\"blobs/k2\",3]]')")
    paged = "SELECT json_extract(c.value, '$[0]'), json_extract(c.value, '$[1]') "
    paged += "FROM doomed_pages, json_each(doomed_pages.copies) c"
    assert conn.execute(paged).fetchall() == [("blobs/k2", 3)]
