"""Scrub: a flipped byte is found, the copy quarantined, a re-push heals it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cargohold.engine import Registry
from cargohold.engine import errors as e
from cargohold.gc import collect
from tests.engine.conftest import digest_of, make_registry, push_blob


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return make_registry(tmp_path)


def stored_path(registry: Registry, tmp_path: Path, data: bytes) -> Path:
    row = registry.store.read().execute("SELECT storage_key FROM blobs WHERE digest = ?", (digest_of(data),))
    return tmp_path / "blobs" / "objects" / row.fetchone()[0]


def flip_a_byte(path: Path, offset: int = 10) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_clean_store_scrubs_clean(registry: Registry) -> None:
    blobs = [os.urandom(10_000 + i) for i in range(5)]
    for blob in blobs:
        push_blob(registry, "r", blob)
    report = registry.scrub()
    assert report.pass_completed and report.blobs_checked == 5 and report.quarantined == []
    assert report.bytes_read == sum(map(len, blobs))
    assert registry.jobs.runs("scrub")[0].status == "succeeded"


def test_flipped_byte_is_quarantined_and_a_repush_heals_it(registry: Registry, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    digest = push_blob(registry, "r", data)
    corrupt = stored_path(registry, tmp_path, data)
    flip_a_byte(corrupt)

    report = registry.scrub()  # the fast pass: xxh3 against the recorded checksum
    assert [q["digest"] for q in report.quarantined] == [digest]
    with pytest.raises(e.BlobUnknown):  # never served again
        registry.stat_blob("r", digest)
    assert registry.jobs.runs("scrub")[0].status == "found-damage"

    push_blob(registry, "r", data)  # the client pushes it again
    assert b"".join(registry.open_blob("r", digest).read()) == data
    assert registry.scrub().quarantined == []
    collect(registry, grace_seconds=0)  # the corrupt copy was queued for deletion
    assert not corrupt.exists()
    assert registry.fsck().clean


def test_full_pass_checks_the_digest_itself(registry: Registry, tmp_path: Path) -> None:
    data = os.urandom(20_000)
    digest = push_blob(registry, "r", data)
    path = stored_path(registry, tmp_path, data)
    flip_a_byte(path)
    with registry.store.write() as conn:  # the checksum was "updated" to match the rot
        import xxhash

        conn.execute(
            "UPDATE blobs SET checksum = ? WHERE digest = ?",
            (f"xxh3-128:{xxhash.xxh3_128(path.read_bytes()).hexdigest()}", digest),
        )
    assert registry.scrub().quarantined == []  # the fast pass cannot see it
    assert [q["digest"] for q in registry.scrub(full=True).quarantined] == [digest]


def test_blobs_without_a_checksum_get_a_full_check_and_a_checksum(registry: Registry) -> None:
    digest = push_blob(registry, "r", b"x" * 3000)
    with registry.store.write() as conn:
        conn.execute("UPDATE blobs SET checksum = NULL")
    report = registry.scrub()
    assert report.checksums_recorded == 1
    row = registry.store.read().execute("SELECT checksum FROM blobs WHERE digest = ?", (digest,)).fetchone()
    assert row[0].startswith("xxh3-128:")


def test_a_missing_object_is_quarantined(registry: Registry, tmp_path: Path) -> None:
    digest = push_blob(registry, "r", b"gone soon")
    stored_path(registry, tmp_path, b"gone soon").unlink()
    assert [q["reason"] for q in registry.scrub().quarantined] == ["stored object is missing"]
    with pytest.raises(e.BlobUnknown):
        registry.stat_blob("r", digest)


def test_rate_limit_and_resume_from_the_cursor(registry: Registry) -> None:
    for i in range(6):
        push_blob(registry, "r", bytes([i]) * 400_000)
    started = time.monotonic()
    first = registry.scrub(rate_bytes_per_second=1_000_000, max_seconds=0.9)
    assert 0 < first.blobs_checked < 6 and not first.pass_completed
    assert time.monotonic() - started >= 0.8  # throttled, not as fast as the disk
    rest = registry.scrub()
    assert rest.pass_completed and first.blobs_checked + rest.blobs_checked == 6
    assert registry.scrub().blobs_checked == 6  # the next pass starts over
