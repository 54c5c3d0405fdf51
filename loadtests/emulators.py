"""The cloud-store emulators of the test suite, started outside pytest for the benchmarks.

``tests/backends/stores/{s3,gcs,azure}.py`` start SeaweedFS, fake-gcs-server and Azurite
as session fixtures and hand a ``cargohold serve`` its environment through ``store_env``.
This module reuses both as they are: the fixture's own generator (``__wrapped__``) becomes a
context manager, and ``store_env`` gets a stand-in for pytest's ``request`` whose
finalizers run when the benchmark's ``ExitStack`` closes. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1 << 20
CLOUD = ("s3", "gcs", "azure")
FIXTURES = {"s3": "s3_server", "gcs": "gcs_server", "azure": "azure_server"}


class StandInRequest:
    """Just what the stores' ``store_env`` asks of ``pytest.FixtureRequest``."""

    def __init__(self, fixtures: dict[str, Any], stack: ExitStack) -> None:
        self._fixtures = fixtures
        self._stack = stack

    def getfixturevalue(self, name: str) -> Any:
        return self._fixtures[name]

    def addfinalizer(self, fn: Callable[[], object]) -> None:
        self._stack.callback(fn)


def _store_module(kind: str) -> Any:
    if kind == "s3":
        from tests.backends.stores import s3 as module
    elif kind == "gcs":
        from tests.backends.stores import gcs as module
    elif kind == "azure":
        from tests.backends.stores import azure as module
    else:
        raise ValueError(f"unknown store {kind!r}")
    return module


@contextlib.contextmanager
def emulator(kind: str) -> Iterator[Any]:
    """Run the session fixture's body (start, wait ready, yield, stop, remove its directory)."""
    module = _store_module(kind)
    fixture = getattr(module, FIXTURES[kind])
    body = getattr(fixture, "__wrapped__", None) or fixture._get_wrapped_function()
    with contextlib.contextmanager(body)() as server:
        yield server


def emulator_pids(server: Any) -> list[int]:
    """The emulator's own process (for its CPU and memory, if wanted)."""
    proc = getattr(server, "process", None)
    return [proc.pid] if proc is not None else []


@dataclass
class Store:
    """One emulator with a fresh bucket (container) and the env for a cargohold serve on it."""

    kind: str
    server: Any
    env: dict[str, str]
    bucket: str
    extra: dict[str, Any] = field(default_factory=dict)

    # -- plain SDK put/get of a file, to see the store's own throughput ------------------
    def sdk_put(self, path: Path, key: str) -> None:
        size = path.stat().st_size
        if self.kind == "s3":
            self.server.client.upload_file(str(path), self.bucket, key)
        elif self.kind == "gcs":
            self.extra["gcs_bucket"].blob(key).upload_from_filename(str(path), timeout=600)
        elif self.kind == "azure":
            client = self.extra["azure_container"].get_blob_client(key)
            with open(path, "rb") as src:
                client.upload_blob(src, length=size, overwrite=True, max_concurrency=4)

    def sdk_get(self, key: str) -> int:
        sink = NullSink()
        if self.kind == "s3":
            self.server.client.download_fileobj(self.bucket, key, sink)
        elif self.kind == "gcs":
            self.extra["gcs_bucket"].blob(key).download_to_file(sink, timeout=600)
        elif self.kind == "azure":
            client = self.extra["azure_container"].get_blob_client(key)
            # Parallel downloads need a seekable target: /dev/null is one, and discards.
            with open(os.devnull, "wb") as devnull:
                return client.download_blob(max_concurrency=4).readinto(devnull)
        return sink.count

    def sdk_delete(self, key: str) -> None:
        with contextlib.suppress(Exception):
            if self.kind == "s3":
                self.server.client.delete_object(Bucket=self.bucket, Key=key)
            elif self.kind == "gcs":
                self.extra["gcs_bucket"].blob(key).delete(timeout=60)
            elif self.kind == "azure":
                self.extra["azure_container"].get_blob_client(key).delete_blob()

    @property
    def sdk_name(self) -> str:
        return {
            "s3": "boto3 upload_file/download_fileobj (managed transfer, default config)",
            "gcs": "google-cloud-storage upload_from_filename/download_to_file",
            "azure": "azure-storage-blob upload_blob/download_blob, max_concurrency=4",
        }[self.kind]


class NullSink:
    """A write-only file that counts bytes (SDK downloads need a file object)."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)

    def seek(self, *args: Any) -> int:  # some SDKs seek to 0 before writing
        return 0

    def tell(self) -> int:
        return self.count

    def flush(self) -> None:
        pass


def start_store(stack: ExitStack, kind: str) -> Store:
    """Start ``kind``'s emulator and make a fresh bucket; both go when ``stack`` closes."""
    module = _store_module(kind)
    server = stack.enter_context(emulator(kind))
    request = StandInRequest({FIXTURES[kind]: server}, stack)
    env = module.store_env(request)  # creates the bucket and registers its removal
    extra: dict[str, Any] = {}
    if kind == "s3":
        bucket = env["CARGOHOLD_STORAGE__S3__BUCKET"]
    elif kind == "gcs":
        bucket = env["CARGOHOLD_STORAGE__GCS__BUCKET"]
        client = server.admin()
        stack.callback(client.close)
        extra["gcs_bucket"] = client.bucket(bucket)
    else:
        bucket = env["CARGOHOLD_STORAGE__AZURE__CONTAINER"]
        service = server.service()
        stack.callback(service.close)
        extra["azure_container"] = service.get_container_client(bucket)
    return Store(kind, server, env, bucket, extra)


def data_directory(server: Any) -> Path | None:
    """Where the emulator keeps its bytes (for disk-usage checks)."""
    for name in ("directory", "workdir"):
        value = getattr(server, name, None)
        if isinstance(value, os.PathLike):
            return Path(value)
    return None
