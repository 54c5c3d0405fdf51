"""Metadata backup and restore: online snapshots while pushes go on, and a restore whose
differences with the stored blobs are found and made safe."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cargohold.engine import errors as e
from cargohold.engine.backup import list_backups, restore
from cargohold.gc import collect
from tests.engine.conftest import digest_of, make_registry, push_blob, push_image


def test_backup_while_pushing_then_restore(tmp_path: Path) -> None:
    registry = make_registry(tmp_path)
    before = push_image(registry, "app", "before", b'{"n":1}', [b"layer before", b"shared"])
    doomed_layer = os.urandom(5000)
    gone = push_image(registry, "gone", "v1", b'{"n":2}', [doomed_layer])

    stop = threading.Event()
    pushed: list[str] = []

    def keep_pushing() -> None:
        other = make_registry(tmp_path)
        i = 0
        while not stop.is_set():
            pushed.append(push_image(other, "busy", f"t{i}", b"{}", [os.urandom(2000)]))
            i += 1

    pusher = threading.Thread(target=keep_pushing)
    pusher.start()
    time.sleep(0.2)
    result = registry.backup()
    time.sleep(0.2)
    stop.set()
    pusher.join()
    assert pushed and result.key.startswith("backups/metadata-") and result.size > 0

    # After the snapshot: a new image, and a GC that removes "gone"'s layer for good.
    after_layer = os.urandom(3000)
    push_image(registry, "app", "after", b'{"n":3}', [after_layer])
    registry.delete_manifest("gone", gone)
    with registry.store.write() as conn:
        conn.execute("UPDATE blobs SET touched_at = 0")
    collect(registry, grace_seconds=0)
    registry.store.close()

    # Restore (registry stopped) and open the store again.
    assert restore(registry.backend, tmp_path / "metadata.db") == result.key
    old = time.time() - 7200  # the objects pushed after the snapshot are hours old by now
    for path in (tmp_path / "blobs" / "objects").rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
    restored = make_registry(tmp_path)
    assert restored.get_manifest("app", "before").digest == before
    with pytest.raises(e.ManifestUnknown):
        restored.get_manifest("app", "after")

    report = restored.fsck(repair=True)
    found = {f.kind for f in report.findings}
    assert {"leak", "missing_object"} <= found
    with pytest.raises(e.BlobUnknown):  # its bytes are gone: 404, never wrong bytes
        restored.open_blob("gone", digest_of(doomed_layer))
    collect(restored, grace_seconds=3600)  # the queued leaks go
    assert digest_of(after_layer) not in {
        row[0] for row in restored.store.read().execute("SELECT digest FROM blobs")
    }
    push_blob(restored, "gone", doomed_layer)  # re-pushes heal the quarantined blobs
    push_blob(restored, "gone", b'{"n":2}')
    assert b"".join(restored.open_blob("gone", digest_of(doomed_layer)).read()) == doomed_layer
    assert restored.fsck().clean


def test_only_the_newest_snapshots_are_kept(tmp_path: Path) -> None:
    registry = make_registry(tmp_path)
    keys = []
    for _ in range(4):
        keys.append(registry.backup(keep=2).key)
        time.sleep(0.01)
    assert [info.key for info in list_backups(registry.backend)] == keys[:1:-1]


def test_restore_refuses_a_damaged_snapshot(tmp_path: Path) -> None:
    registry = make_registry(tmp_path)
    key = registry.backup().key
    registry.backend.put(key, [b"not a database at all" * 100])
    with pytest.raises(Exception, match=r"not a database|not a sound"):
        restore(registry.backend, tmp_path / "restored" / "metadata.db", key)
    assert not (tmp_path / "restored" / "metadata.db").exists()
