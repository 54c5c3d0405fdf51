"""Metadata backups: consistent online snapshots of the SQLite store, kept in the backend.

A snapshot is taken with SQLite's online backup API (never a file copy, which could
catch a half-written page): writers go on while it runs. It is streamed to the backend
as ``backups/metadata-<UTC time>.sqlite`` (see ``layout``), and only the newest
``keep`` snapshots are kept.

Restoring rebuilds the metadata store from a snapshot while the registry is stopped.
The blobs are already in the backend; what changed after the snapshot shows up in
``fsck``: objects pushed later are leaks (the GC reclaims them), and rows whose objects
were deleted later are quarantined by the restore, so they answer 404 and clients push
them again. Nothing is ever served that does not match its digest.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cargohold.backends.base import Backend, ObjectInfo
from cargohold.engine.layout import BACKUP_PREFIX, backup_key
from cargohold.engine.metadata import MetadataStore

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class BackupResult:
    key: str
    size: int
    seconds: float
    removed: list[str]


def snapshot_to(store: MetadataStore, target: Path) -> None:
    """A consistent copy of the live database at ``target`` (SQLite's online backup)."""
    destination = sqlite3.connect(target)
    try:
        store.read().backup(destination)
    finally:
        destination.close()


def backup(store: MetadataStore, backend: Backend, keep: int = 7) -> BackupResult:
    started = time.monotonic()
    key = backup_key(time.time())
    with tempfile.TemporaryDirectory(prefix="cargohold-backup-") as directory:
        snapshot = Path(directory) / "metadata.sqlite"
        snapshot_to(store, snapshot)
        with open(snapshot, "rb") as handle:
            size = backend.put(key, iter(lambda: handle.read(CHUNK), b""), {"kind": "metadata-backup"})
    removed = [info.key for info in list_backups(backend)[keep:]]
    if removed:
        backend.delete_many(removed)
    return BackupResult(key, size, time.monotonic() - started, removed)


def list_backups(backend: Backend) -> list[ObjectInfo]:
    """Snapshots in the backend, newest first (their names sort by time)."""
    return sorted(backend.list(BACKUP_PREFIX), key=lambda info: info.key, reverse=True)


def restore(backend: Backend, metadata_path: Path, key: str | None = None) -> str:
    """Replace the metadata store with a snapshot (the newest if ``key`` is None).

    The registry must be stopped. The current database, if any, is kept beside it as
    ``metadata.db.before-restore-<time>``.
    """
    if key is None:
        backups = list_backups(backend)
        if not backups:
            raise FileNotFoundError("no metadata backups in the store")
        key = backups[0].key
    metadata_path.parent.mkdir(parents=True, exist_ok=True)
    incoming = metadata_path.with_name(metadata_path.name + ".restoring")
    with open(incoming, "wb") as handle:
        for chunk in backend.read(key):
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        _check_sound(incoming, key)
    except BaseException:
        incoming.unlink()
        raise
    kept = f"{metadata_path.name}.before-restore-{int(time.time())}"
    for suffix in ("", "-wal", "-shm"):  # the database moves aside whole, with its WAL
        current = metadata_path.with_name(metadata_path.name + suffix)
        if current.exists():
            current.rename(metadata_path.with_name(kept + suffix))
    incoming.rename(metadata_path)
    return key


def _check_sound(path: Path, key: str) -> None:
    check = sqlite3.connect(path)
    try:
        if check.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise ValueError(f"backup {key} is not a sound SQLite database")
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"backup {key} is not a sound SQLite database: {exc}") from exc
    finally:
        check.close()
