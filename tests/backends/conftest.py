"""The backend conformance suite runs every test against every backend.

Each backend joins with one module in ``tests/backends/stores/`` that provides
``make_<name>_backend`` (a fresh, empty backend on a real server: a new bucket,
container or prefix) and ``make_unreachable_<name>_backend`` (the same backend
pointed at a port where nothing listens). Adding a backend costs a module and a
line in ``STORES``, never a new test file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType

import pytest

from cargohold.backends import Backend
from tests.backends.stores import azure, filesystem, gcs, s3
from tests.backends.stores.azure import azure_server  # noqa: F401  (registers the session fixture)
from tests.backends.stores.gcs import gcs_server  # noqa: F401  (registers the session fixture)
from tests.backends.stores.s3 import s3_server  # noqa: F401  (registers the session fixture)

STORES: dict[str, ModuleType] = {"filesystem": filesystem, "s3": s3, "gcs": gcs, "azure": azure}
_selected = os.environ.get("CARGOHOLD_TEST_BACKENDS")
NAMES = [name for name in STORES if _selected is None or name in _selected.split(",")]


@pytest.fixture(params=NAMES)
def store_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(store_name: str, request: pytest.FixtureRequest) -> Iterator[Backend]:
    yield from STORES[store_name].backend(request)


@pytest.fixture
def unreachable_backend(store_name: str, request: pytest.FixtureRequest) -> Backend:
    return STORES[store_name].unreachable_backend(request)  # type: ignore[no-any-return]
