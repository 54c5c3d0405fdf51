"""The Azure backend for the conformance suite: one Azurite per session, a container per test.

Azurite runs as ``docs/storage-emulators.md`` says: blob service only, bound to 127.0.0.1
on a free port, in its own temporary directory, with ``--skipApiVersionCheck`` (the SDK
speaks a newer API version than Azurite 3.35 knows), stopped by PID. It comes from npm
into ``.tools/`` (``scripts/test.sh`` installs it); a missing binary fails loudly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.storage.blob import BlobServiceClient

from cargohold.backends import Backend
from cargohold.backends.azure import AzureBackend
from cargohold.config import AzureStorage
from tests.support.servers import free_port

ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Microsoft).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[3]
INSTALL_HINT = "install it with: npm install --prefix .tools azurite@3.35.0 (bash scripts/test.sh does)"


def connection_string(endpoint: str) -> str:
    """For Azurite at ``endpoint`` (host:port): path-style, the account in the path."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://{endpoint}/{ACCOUNT};"
    )


@dataclass(frozen=True)
class AzuriteServer:
    port: int
    directory: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def blob_url(self) -> str:
        return f"http://{self.endpoint}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return connection_string(self.endpoint)

    def service(self) -> BlobServiceClient:
        """A plain SDK client, for looking behind the backend's back."""
        return BlobServiceClient.from_connection_string(self.connection_string)

    def new_container(self) -> str:
        name = f"t-{uuid.uuid4().hex[:24]}"
        self.service().create_container(name)
        return name

    def drop_container(self, name: str) -> None:
        self.service().delete_container(name)  # Azure deletes a container with its blobs

    def settings(self, container: str, **overrides: Any) -> dict[str, Any]:
        return backend_settings(self.connection_string, container, **overrides)


def backend_settings(connection: str, container: str, **overrides: Any) -> dict[str, Any]:
    """``AzureBackend`` keyword arguments, validated as the config file's would be."""
    fields = {
        "container": container,
        "prefix": "registry",
        "connection_string": connection,
        "block_size": 4 * MiB,  # small, so that the suite's objects cross many block boundaries
        **overrides,
    }
    return AzureStorage(**fields).model_dump()


def _azurite() -> str:
    """``azurite-blob`` on PATH (the test script puts ``.tools`` there), else in ``.tools``."""
    local = REPO / ".tools" / "node_modules" / ".bin" / "azurite-blob"
    found = shutil.which("azurite-blob") or (str(local) if local.is_file() else None)
    if found is None:
        pytest.fail(
            f"Azurite (`azurite-blob`) is not installed; the Azure backend tests need it: {INSTALL_HINT}"
        )
    return found


def _wait_ready(
    proc: subprocess.Popen[bytes], server: AzuriteServer, log: Path, timeout: float = 30.0
) -> None:
    """Any HTTP answer means it listens (an unsigned request gets 403)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"azurite-blob exited with {proc.returncode} before it was ready:\n{log.read_text()[-4000:]}"
            )
        try:
            httpx.get(f"{server.blob_url}?comp=list", timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    pytest.fail(f"azurite-blob was not ready after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen[bytes], directory: Path) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def azure_server() -> Iterator[AzuriteServer]:
    """One Azurite for the session; tests isolate themselves with containers of their own."""
    azurite = _azurite()
    directory = Path(tempfile.mkdtemp(prefix="cargohold-azurite-"))
    (directory / "data").mkdir()
    server = AzuriteServer(free_port(), directory)
    log = directory / "azurite.log"
    command = [
        azurite,
        *("--blobHost", "127.0.0.1", "--blobPort", str(server.port)),
        *("--location", str(directory / "data")),
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=directory)
    try:
        _wait_ready(proc, server, log)
        yield server
    finally:
        _stop(proc, directory)


def _server(request: pytest.FixtureRequest) -> AzuriteServer:
    return request.getfixturevalue("azure_server")  # type: ignore[no-any-return]


def fresh_container(request: pytest.FixtureRequest) -> tuple[AzuriteServer, str]:
    """A new container on the session's server, removed with everything in it after the test."""
    server = _server(request)
    container = server.new_container()
    request.addfinalizer(lambda: server.drop_container(container))
    return server, container


def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    server, container = fresh_container(request)
    yield AzureBackend(**server.settings(container))


def unreachable_backend(request: pytest.FixtureRequest) -> Backend:
    """A port where nothing listens, with the default retry settings: they must fail fast."""
    return AzureBackend(**backend_settings(connection_string(f"127.0.0.1:{free_port()}"), "gone"))


def server_endpoint(request: pytest.FixtureRequest) -> str:
    return _server(request).endpoint


def store_env(request: pytest.FixtureRequest, endpoint: str | None = None) -> dict[str, str]:
    """Environment for a ``cargohold serve`` on a fresh container (through ``endpoint``, a
    host:port such as a proxy's, if given)."""
    server, container = fresh_container(request)
    section = "CARGOHOLD_STORAGE__AZURE__"
    return {
        "CARGOHOLD_STORAGE__BACKEND": "azure",
        f"{section}CONTAINER": container,
        f"{section}PREFIX": "registry",
        f"{section}CONNECTION_STRING": connection_string(endpoint or server.endpoint),
    }
