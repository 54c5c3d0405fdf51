"""Shared fixtures. ``CARGOHOLD_TEST_TARGET=distribution`` points the HTTP-level tests
at CNCF Distribution instead of cargohold, to check a test's expectation against the
reference implementation."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.servers import RegistryProcess


@pytest.fixture(scope="session")
def registry() -> Iterator[RegistryProcess]:
    """A running registry for the whole session (shared: use unique repository names)."""
    kind = os.environ.get("CARGOHOLD_TEST_TARGET", "cargohold")
    with RegistryProcess(kind=kind) as server:
        yield server


@pytest.fixture
def fresh_registry() -> Iterator[RegistryProcess]:
    """A private registry for tests that restart, kill or inspect the server."""
    kind = os.environ.get("CARGOHOLD_TEST_TARGET", "cargohold")
    with RegistryProcess(kind=kind) as server:
        yield server
