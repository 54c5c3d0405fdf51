"""Metadata backup and restore with the snapshot kept in each store."""

from __future__ import annotations

import os
from pathlib import Path

from cargohold.backends import Backend
from cargohold.engine import MetadataStore, Registry
from cargohold.engine.backup import list_backups, restore
from tests.engine.conftest import digest_of, push_image


def test_backup_and_restore_through_the_store(backend: Backend, tmp_path: Path) -> None:
    registry = Registry(MetadataStore(tmp_path / "first" / "metadata.db"), backend)
    layer = os.urandom(300_000)
    digest = push_image(registry, "app", "v1", b'{"os":"linux"}', [layer])
    result = registry.backup(keep=2)
    assert [info.key for info in list_backups(backend)] == [result.key]

    restored_path = tmp_path / "second" / "metadata.db"
    assert restore(backend, restored_path) == result.key
    again = Registry(MetadataStore(restored_path), backend)
    assert again.get_manifest("app", "v1").digest == digest
    assert b"".join(again.open_blob("app", digest_of(layer)).read()) == layer
    assert again.fsck().clean
