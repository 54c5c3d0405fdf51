"""Fixtures for the replication tests: an engine-level registry on a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from cargohold.engine import Registry
from tests.engine.conftest import make_registry


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return make_registry(tmp_path / "data")
