"""Read-only mode: every write is refused, reads go on, and every process sees the switch."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cargohold.engine import errors as e
from cargohold.engine.maintenance import CACHE_SECONDS
from cargohold.gc import collect
from tests.engine.conftest import digest_of, make_registry, push_blob, push_image


def test_config_default_blocks_every_write_but_not_reads(tmp_path: Path) -> None:
    writable = make_registry(tmp_path)
    digest = push_image(writable, "app", "v1", b"{}", [b"layer"])
    upload = writable.start_upload("app")
    registry = make_registry(tmp_path, read_only=True)
    assert registry.get_manifest("app", "v1").digest == digest
    assert b"".join(registry.open_blob("app", digest_of(b"layer")).read()) == b"layer"
    writes = [
        lambda: registry.start_upload("app"),
        lambda: registry.append_upload("app", upload.id, [b"x"]),
        lambda: registry.finish_upload("app", upload.id, digest_of(b"")),
        lambda: registry.mount_blob("other", digest_of(b"layer"), "app"),
        lambda: registry.put_manifest("app", "v2", b"{}", None),
        lambda: registry.delete_manifest("app", "v1"),
        lambda: registry.delete_manifest("app", digest, force=True),
        lambda: registry.delete_blob("app", digest_of(b"layer")),
        lambda: collect(registry, grace_seconds=0),
    ]
    for write in writes:
        with pytest.raises(e.ReadOnly):
            write()
    assert collect(registry, grace_seconds=0, dry_run=True).dry_run  # a plan changes nothing


def test_switching_at_run_time_reaches_other_processes(tmp_path: Path) -> None:
    admin, worker = make_registry(tmp_path), make_registry(tmp_path)
    push_blob(worker, "app", b"before")
    admin.read_only.set(True)
    time.sleep(CACHE_SECONDS + 0.1)
    with pytest.raises(e.ReadOnly):
        push_blob(worker, "app", b"during")
    admin.read_only.set(None)  # back to the config's value (writable)
    time.sleep(CACHE_SECONDS + 0.1)
    assert push_blob(worker, "app", b"after") == digest_of(b"after")
