"""The Azure SDK boundary of the Azure backend: clients, retries, errors, blocks, downloads.

Everything here speaks ``azure.storage.blob``; ``azure`` and ``azure_staged`` build the
contract of ``base`` on top of it. Exceptions of the SDK become ours in exactly one place,
``azure_errors``.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import requests
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import BlobClient, BlobServiceClient, ExponentialRetry, StorageErrorCode
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from cargohold.backends.base import BackendError, ObjectNotFound, StagedBusy

MiB = 1024 * 1024
READ_PIECE = 1 * MiB  # what read() yields: the engine's unit of streaming, as on the filesystem
CONNECT_TIMEOUT = 5.0  # seconds; a TCP (and TLS) handshake needs far less, a dead host never ends
BACKOFF_FIRST = 0.5  # seconds before the first retry ...
BACKOFF_CAP = 30.0  # ... doubling up to this, with jitter
CONNECT_RETRIES = 2  # a refused connection is retried briefly: the store may be restarting
POOL_SIZE = 64  # connections kept per host: the API runs backend calls on a thread pool
ENV_CONNECTION_STRING = "AZURE_STORAGE_CONNECTION_STRING"

_BUSY_CODES = {  # what a create-only commit of a staged upload hears when another writer won
    StorageErrorCode.BLOB_ALREADY_EXISTS,  # the object is there (409)
    StorageErrorCode.CONDITION_NOT_MET,  # the same, as a 412
    StorageErrorCode.INVALID_BLOCK_LIST,  # the winner's commit discarded the blocks we list
}


class Unreachable(BackendError):
    """The request never got an answer (refused, reset, timed out): retrying other keys is pointless."""


class RangeNotSatisfiable(BackendError):
    """A ranged read that starts at or past the end of the blob (the filesystem yields nothing)."""


@contextlib.contextmanager
def azure_errors(what: str, *, staged: bool = False) -> Iterator[None]:
    """The one place where SDK exceptions become ours. ``staged``: a refused create-only
    commit means another writer committed the upload first (``StagedBusy``), not a failure."""
    try:
        yield
    except AzureError as exc:
        raise _translate(exc, what, staged=staged) from exc


def _translate(exc: AzureError, what: str, *, staged: bool) -> BackendError:
    response = getattr(exc, "response", None)
    # The public methods parse the error code; the generated layer (open_range) leaves it in a header.
    code = getattr(exc, "error_code", None) or getattr(response, "headers", {}).get("x-ms-error-code")
    status = getattr(exc, "status_code", None)
    summary = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if code == StorageErrorCode.CONTAINER_NOT_FOUND:
        # A configuration problem (503), never a missing key (404).
        return BackendError(f"{what}: the container does not exist")
    if isinstance(exc, ResourceNotFoundError):
        return ObjectNotFound(what)
    if staged and (isinstance(exc, (ResourceModifiedError, ResourceExistsError)) or code in _BUSY_CODES):
        return StagedBusy(f"{what}: another writer changed it ({code or status})")
    if status == 416 or code == StorageErrorCode.INVALID_RANGE:
        return RangeNotSatisfiable(what)
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return Unreachable(f"{what}: azure storage unreachable: {summary}")
    if isinstance(exc, HttpResponseError):
        return BackendError(f"{what}: azure storage answered {status} {code or ''}: {summary}")
    return BackendError(f"{what}: {summary}")


class _Backoff(ExponentialRetry):
    """The SDK's retry machinery (5xx, 408, timeouts, resets) with a curve fit for a request
    path: the SDK's default waits 15 s, then 18 s, then 24 s, so one request to a dead
    endpoint hangs for over a minute. Here the waits double from half a second ("equal
    jitter", so that workers retrying together spread out), and refused connections get only
    two retries, which is enough to ride out a restart and fails a dead store in seconds."""

    def __init__(self, max_attempts: int) -> None:
        retries = max_attempts - 1
        super().__init__(
            retry_total=retries,
            retry_connect=min(retries, CONNECT_RETRIES),
            retry_read=retries,
            retry_status=retries,
        )

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        ceiling = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** max(settings["count"] - 1, 0))
        return random.uniform(ceiling / 2, ceiling)


class _PooledAdapter(HTTPAdapter):
    """Connections for the SDK's transport: no retries of its own (the pipeline retries),
    a pool that fits the API's thread pool, and 64 KiB socket writes as the SDK's adapter."""

    def __init__(self) -> None:
        super().__init__(
            pool_connections=4,
            pool_maxsize=POOL_SIZE,
            max_retries=Retry(total=False, redirect=False, raise_on_status=False),
        )

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["blocksize"] = 64 * 1024
        super().init_poolmanager(*args, **kwargs)


def _http_session() -> requests.Session:
    session = requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, _PooledAdapter())
    return session


def open_service(
    connection_string: str | None,
    account_url: str | None,
    account_key: str | None,
    timeout: float,
    max_attempts: int,
) -> BlobServiceClient:
    """A client from a connection string (``AZURE_STORAGE_CONNECTION_STRING`` when none is
    configured), else from an account URL: with ``account_key`` (shared key), with a SAS in
    the URL, or with ``DefaultAzureCredential`` (managed identity, ...) when azure-identity
    is installed. No request is made here: a store that is down fails the first call."""
    # The timeouts and the read size belong to the transport: the SDK applies them only to a
    # transport it builds itself, and one built here (for its pool size) keeps its own.
    transport = RequestsTransport(
        session=_http_session(),
        session_owner=True,
        connection_timeout=min(timeout, CONNECT_TIMEOUT),
        read_timeout=timeout,
        connection_data_block_size=READ_PIECE,
    )
    options: dict[str, Any] = {
        "retry_policy": _Backoff(max_attempts),
        "transport": transport,
    }
    connection_string = connection_string or os.environ.get(ENV_CONNECTION_STRING)
    if connection_string:
        return BlobServiceClient.from_connection_string(connection_string, **options)
    if not account_url:
        raise ValueError(
            f"azure storage needs a connection_string (or {ENV_CONNECTION_STRING}) or an account_url"
        )
    if account_key:
        account = BlobServiceClient(account_url).account_name
        credential: Any = {"account_name": account, "account_key": account_key}
    elif "sig=" in account_url:
        credential = None
    else:
        credential = _default_credential()
    return BlobServiceClient(account_url, credential=credential, **options)


def _default_credential() -> Any:
    try:
        from azure.identity import DefaultAzureCredential  # type: ignore[import-not-found]
    except ImportError:
        return None  # anonymous: a public container, readable only
    return DefaultAzureCredential()


def account_key_of(service: BlobServiceClient, configured: str | None) -> str | None:
    """The key that signs SAS URLs: the configured one, else the connection string's."""
    return configured or getattr(service.credential, "account_key", None)


# -- blocks ---------------------------------------------------------------------------------
class BlockSink:
    """Cuts a byte stream into blocks of at most ``block_size`` and stages each on ``blob``
    as soon as it is full, under the id ``namer(size)`` gives it. It owns one buffer of
    ``block_size`` bytes, reused; a write that brings a whole block at once is staged
    straight from the caller's memory."""

    def __init__(self, blob: BlobClient, block_size: int, what: str, namer: Callable[[int], str]) -> None:
        self.blob = blob
        self.block_size = block_size
        self._what = what
        self._namer = namer
        self._buffer: bytearray | None = None
        self._filled = 0

    @property
    def buffered(self) -> int:
        return self._filled

    def buffered_view(self) -> memoryview:
        return memoryview(self._buffer or b"")[: self._filled]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            if not self._filled and len(view) >= self.block_size:
                self._stage(view[: self.block_size])
                view = view[self.block_size :]
                continue
            if self._buffer is None:
                self._buffer = bytearray(self.block_size)
            take = min(len(view), self.block_size - self._filled)
            self._buffer[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == self.block_size:
                self.stage_buffered()

    def stage_buffered(self) -> None:
        if self._filled:
            self._stage(self.buffered_view())
            self._filled = 0

    def release(self) -> None:
        """Forget the buffer and give its memory back."""
        self._buffer, self._filled = None, 0

    def _stage(self, data: memoryview) -> None:
        block_id = self._namer(len(data))
        with azure_errors(self._what):
            self.blob.stage_block(block_id, data, length=len(data))


# -- downloads ------------------------------------------------------------------------------
def open_range(blob: BlobClient, start: int, end: int | None, what: str) -> Iterator[bytes]:
    """One GET of ``[start, end)``, sent now (so a missing blob or a dead store fails this
    call), whose body is then streamed in ``READ_PIECE``s as the caller consumes it.

    Why not ``BlobClient.download_blob``: it buffers every ranged request whole, and does so
    through ``b"".join(list(stream))``, where ``list()`` sizes itself by the stream's
    ``len()``, its byte count: one pointer per byte, so an 8 MiB request peaks at 72 MiB of
    memory. Small requests keep that down but cost a round trip each (1 MiB ranges ran at
    15 to 50 MiB/s against Azurite, one streamed GET at 340 to 390 MiB/s, holding 2 MiB).
    So this calls the SDK's generated Get Blob operation, the one ``download_blob`` itself
    uses, through the same pipeline (credentials, retries, timeouts), and keeps its body
    as a stream. It is the one place that touches the SDK's internals; the tests in
    ``tests/backends/test_azure.py`` pin its memory and its errors.
    """
    options: dict[str, Any] = {}
    if start or end is not None:  # a whole read has no Range: it works on empty blobs too
        options["range"] = f"bytes={start}-{'' if end is None else end - 1}"
    with azure_errors(what):
        response, body = blob._client.blob.download(
            cls=lambda pipeline_response, stream, _headers: (pipeline_response.http_response, stream),
            **options,
        )
    return pieces(body, what, response.close)


def pieces(chunks: Iterator[bytes], what: str, close: Callable[[], None]) -> Iterator[bytes]:
    """The body in ``READ_PIECE``s; errors mid-stream are ours too, and a reader that stops
    early gives the connection back."""
    try:
        with azure_errors(what):
            for chunk in chunks:
                if len(chunk) <= READ_PIECE:
                    yield chunk
                    continue
                view = memoryview(chunk)
                for at in range(0, len(chunk), READ_PIECE):
                    yield bytes(view[at : at + READ_PIECE])
    finally:
        close()
