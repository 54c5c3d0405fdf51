"""The filesystem backend for the conformance suite: a fresh root per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cargohold.backends import Backend, FilesystemBackend


def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    tmp_path = request.getfixturevalue("tmp_path")
    yield FilesystemBackend(tmp_path / "store")


def unreachable_backend(request: pytest.FixtureRequest) -> Backend:
    """A root that vanished (an unmounted volume): every call must fail cleanly."""
    tmp_path = request.getfixturevalue("tmp_path")
    store = FilesystemBackend(tmp_path / "gone")
    import shutil

    shutil.rmtree(tmp_path / "gone")
    return store


def store_env(request: pytest.FixtureRequest, endpoint: str | None = None) -> dict[str, str]:
    """The default: a registry on its own data directory's filesystem store."""
    return {}
