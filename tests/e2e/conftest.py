"""Fixtures for the end-to-end tests with real registry clients."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.clients import ContainersStorage, DockerDaemon, Skopeo
from tests.support.servers import RegistryProcess


@pytest.fixture
def repo_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Make repository names unique to this test run (the session registry is shared)."""
    run_id = uuid.uuid4().hex[:8]
    test = request.node.name.split("[")[0].removeprefix("test_").replace("_", "-")[:30]

    def make(suffix: str = "img") -> str:
        return f"e2e/{test}-{run_id}/{suffix}"

    return make


@pytest.fixture
def skopeo(tmp_path: Path) -> Skopeo:
    workdir = tmp_path / "skopeo"
    workdir.mkdir()
    return Skopeo(workdir)


@pytest.fixture(scope="session")
def docker_daemon(registry: RegistryProcess) -> Iterator[DockerDaemon]:
    """A private dockerd (+ containerd) for the session, trusting the session registry over HTTP."""
    with DockerDaemon(insecure_registries=[registry.host]) as daemon:
        yield daemon


@pytest.fixture
def containers_storage() -> Iterator[ContainersStorage]:
    storage = ContainersStorage()
    yield storage
    storage.cleanup()
