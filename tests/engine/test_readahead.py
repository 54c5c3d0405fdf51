"""Reading the metadata file ahead of a GC sweep: all of it, or nothing if it is too big or
already in the page cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cargohold.engine import readahead
from cargohold.engine.readahead import CHUNK, ReadAhead
from tests.engine.conftest import make_registry


@pytest.fixture
def cold(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the page cache held none of the file (dropping it needs root, and on a tmpfs
    it cannot be dropped at all)."""
    monkeypatch.setattr(readahead, "_cached", lambda fd, size: False)


def test_reads_the_whole_file_in_the_background(tmp_path: Path, cold: None) -> None:
    path = tmp_path / "data"
    path.write_bytes(os.urandom(3 * CHUNK + 123))
    reader = ReadAhead.start(path, limit=4 * CHUNK)
    assert reader is not None
    reader.join(10)
    assert reader.bytes_read == 3 * CHUNK + 123


def test_leaves_a_file_over_the_limit_or_missing_alone(tmp_path: Path, cold: None) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"x" * 1000)
    assert ReadAhead.start(path, limit=999) is None
    assert ReadAhead.start(tmp_path / "missing") is None


def test_leaves_a_file_the_page_cache_holds_alone(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(os.urandom(2 * CHUNK))
    path.read_bytes()  # every page is in the cache now
    assert ReadAhead.start(path, limit=4 * CHUNK) is None


def test_the_store_reads_its_own_database_file(tmp_path: Path, cold: None) -> None:
    store = make_registry(tmp_path).store
    reader = store.read_ahead()
    assert reader is not None
    reader.join(10)
    assert reader.bytes_read == store.path.stat().st_size > 0
