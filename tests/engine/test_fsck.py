"""fsck finds each kind of damage injected on purpose, repairs what is safe, and reports a
clean store as clean (also through the CLI's exit codes and JSON)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cargohold.engine import Registry
from cargohold.engine import errors as e
from tests.engine.conftest import digest_of, make_registry, push_blob, push_image
from tests.support.servers import cargohold_command


@pytest.fixture
def populated(tmp_path: Path) -> Registry:
    registry = make_registry(tmp_path)
    push_image(registry, "app", "v1", b'{"a":1}', [b"layer one", b"layer two"])
    push_image(registry, "app", "v2", b'{"a":2}', [b"layer two", b"layer three"])
    push_blob(registry, "other", b"lonely blob")
    return registry


def kinds(registry: Registry, **options: bool) -> list[str]:
    return sorted(finding.kind for finding in registry.fsck(**options).unrepaired)


def key_of(registry: Registry, data: bytes) -> str:
    row = registry.store.read().execute("SELECT storage_key FROM blobs WHERE digest = ?", (digest_of(data),))
    return str(row.fetchone()[0])


def test_a_clean_store_is_clean(populated: Registry) -> None:
    report = populated.fsck()
    assert report.clean and report.findings == [] and report.blobs_checked == 6


def test_missing_object_is_quarantined_by_repair(populated: Registry) -> None:
    populated.backend.delete(key_of(populated, b"layer one"))
    assert kinds(populated) == ["missing_object"]
    # Bytes cannot be invented: repair takes the row out of service so clients push it again.
    # v1 still needs the blob: its reference dangles (and is reported) until the re-push.
    assert kinds(populated, repair=True) == ["dangling_reference"]
    with pytest.raises(e.BlobUnknown):
        populated.stat_blob("app", digest_of(b"layer one"))
    assert kinds(populated) == ["dangling_reference"]
    push_blob(populated, "app", b"layer one")
    assert kinds(populated) == []


def test_corrupted_size(populated: Registry, tmp_path: Path) -> None:
    path = tmp_path / "blobs" / "objects" / key_of(populated, b"layer three")
    path.write_bytes(b"truncated")
    assert kinds(populated) == ["size_mismatch"]


def test_dropped_reference_row_shows_as_refcount_drift_and_is_recounted(populated: Registry) -> None:
    with populated.store.write() as conn:
        conn.execute("DELETE FROM manifest_references WHERE target_digest = ?", (digest_of(b"layer one"),))
    assert kinds(populated) == ["refcount"]
    assert kinds(populated, repair=True) == []
    assert kinds(populated) == []


def test_changed_refcount_is_recounted(populated: Registry) -> None:
    with populated.store.write() as conn:
        conn.execute(
            "UPDATE blobs SET manifest_refs = 7, repo_links = 0 WHERE digest = ?", (digest_of(b"layer two"),)
        )
    assert kinds(populated) == ["refcount"]
    populated.fsck(repair=True)
    row = populated.store.read().execute(
        "SELECT manifest_refs, repo_links FROM blobs WHERE digest = ?", (digest_of(b"layer two"),)
    )
    assert row.fetchone() == (2, 1)


def test_lost_manifest_row_leaves_a_dangling_tag_and_orphan_references(populated: Registry) -> None:
    with populated.store.write() as conn:
        conn.execute(
            "DELETE FROM manifests WHERE digest = (SELECT manifest_digest FROM tags WHERE name = 'v2')"
        )
    assert kinds(populated) == ["content_count", "dangling_tag", "orphan_reference"]
    assert kinds(populated, repair=True) == ["dangling_tag"]  # tags go only with the explicit flag
    assert kinds(populated, repair=True, drop_dangling_tags=True) == []
    three = populated.store.read().execute(
        "SELECT manifest_refs FROM blobs WHERE digest = ?", (digest_of(b"layer three"),)
    )
    assert three.fetchone() == (0,)  # no longer pinned: the GC may take it


def test_dangling_reference(populated: Registry) -> None:
    with populated.store.write() as conn:
        conn.execute("DELETE FROM blobs WHERE digest = ?", (digest_of(b"layer one"),))
    assert "dangling_reference" in kinds(populated)


def test_orphan_object_is_a_leak_queued_for_the_gc(populated: Registry) -> None:
    populated.backend.put("blobs/zz/orphan", [b"left by a crash"])
    old = time.time() - 7200
    os.utime(Path(populated.backend.local_path("blobs/zz/orphan")), (old, old))  # type: ignore[attr-defined]
    assert kinds(populated) == ["leak"]
    assert kinds(populated, repair=True) == []
    queued = populated.store.read().execute("SELECT storage_key FROM doomed_objects").fetchall()
    assert queued == [("blobs/zz/orphan",)]


def test_expired_upload_and_stuck_tombstone(populated: Registry) -> None:
    upload = populated.start_upload("app")
    with populated.store.write() as conn:
        conn.execute("UPDATE uploads SET expires_at = 0 WHERE id = ?", (upload.id,))
        conn.execute("UPDATE blobs SET state = 'deleting' WHERE digest = ?", (digest_of(b"lonely blob"),))
        conn.execute("DELETE FROM repository_blobs WHERE digest = ?", (digest_of(b"lonely blob"),))
        conn.execute("UPDATE blobs SET repo_links = 0 WHERE digest = ?", (digest_of(b"lonely blob"),))
    assert kinds(populated) == ["expired_upload", "stuck_tombstone"]
    assert kinds(populated, repair=True) == []
    assert list(populated.backend.list_staged()) == []


def test_cli_exit_codes_and_json(populated: Registry, tmp_path: Path) -> None:
    env = {**os.environ, "CARGOHOLD_DATA_DIR": str(tmp_path)}
    clean = subprocess.run([*cargohold_command(), "fsck", "--json"], env=env, capture_output=True, text=True)
    assert clean.returncode == 0 and json.loads(clean.stdout)["clean"] is True
    populated.backend.delete(key_of(populated, b"layer one"))
    broken = subprocess.run([*cargohold_command(), "fsck", "--json"], env=env, capture_output=True, text=True)
    assert broken.returncode == 1
    assert [f["kind"] for f in json.loads(broken.stdout)["findings"]] == ["missing_object"]
