"""Fixtures for the HTTP conformance tests: a client on the shared registry, a unique
repository per test, and private cargohold servers with special settings."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.api.oci import ON_DISTRIBUTION, unique_repo
from tests.support.servers import RegistryProcess


@pytest.fixture
def client(registry: RegistryProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=registry.url, timeout=30.0) as c:
        yield c


@pytest.fixture
def repo() -> str:
    """A repository name that no other test touches."""
    return unique_repo()


def _private_server(env: dict[str, str]) -> Iterator[RegistryProcess]:
    if ON_DISTRIBUTION:
        pytest.skip("cargohold-only: needs a cargohold configuration setting")
    with RegistryProcess(kind="cargohold", env=env) as server:
        yield server


@pytest.fixture(scope="module")
def no_delete_registry() -> Iterator[RegistryProcess]:
    """cargohold with deletes disabled by configuration."""
    yield from _private_server({"CARGOHOLD_DELETE_ENABLED": "false"})


@pytest.fixture(scope="module")
def expiring_registry() -> Iterator[RegistryProcess]:
    """cargohold whose upload sessions expire after about a second."""
    yield from _private_server({"CARGOHOLD_UPLOADS__EXPIRY_HOURS": "0.0003"})


# Small limits, so that pagination and chunk minimums show with a handful of objects.
SMALL_LIMITS = {
    "CARGOHOLD_LIMITS__REFERRERS_PAGE_SIZE": "2",
    "CARGOHOLD_LIMITS__TAGS_MAX_N": "3",
    "CARGOHOLD_LIMITS__CATALOG_MAX_N": "3",
    "CARGOHOLD_UPLOADS__CHUNK_MIN_LENGTH": "64",
}


@pytest.fixture(scope="session")
def small_limits_registry() -> Iterator[RegistryProcess]:
    """cargohold with tiny page sizes and a minimum chunk length."""
    yield from _private_server(SMALL_LIMITS)
