"""Connecting to GCS, and the one place where its errors become ours.

``gcs_client`` and ``gcs_io`` are the only modules of cargohold that import
``google.cloud``, ``google.api_core`` or ``google.auth``; the rest of the GCS backend
(``gcs``, ``gcs_staged``) sees object names, bytes and our own errors.

Why we do not use the SDK's own retry objects: they are bounded by a *deadline*
(120 s by default), so a client pointed at a closed port (an emulator that is not
running, ``STORAGE_EMULATOR_HOST`` pointing nowhere) retries connection errors for
70 to 120 s before it fails. A registry request must fail with a 503 within seconds, so
every SDK call is made with ``retry=None`` and wrapped in :meth:`Calls.run`: at most
``max_attempts`` attempts, exponential backoff with jitter, only on throttling, 5xx and
connection errors, and never past the configured ``timeout`` in total.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import google.auth
import requests
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import storage
from google.cloud.storage import exceptions as storage_exceptions
from google.oauth2 import service_account
from requests.adapters import HTTPAdapter

from cargohold.backends.base import BackendError, ObjectNotFound

T = TypeVar("T")

# Least privilege: object data and metadata, no IAM or bucket configuration.
SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
# Connecting takes milliseconds on GCS; a peer that does not answer within this is down.
CONNECT_TIMEOUT = 5.0
FIRST_BACKOFF = 0.2
MAX_BACKOFF = 8.0
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Concurrent requests per client: registry worker threads plus delete_many's pool.
POOL_SIZE = 32


class PreconditionFailed(BackendError):
    """A generation precondition did not hold (the name was taken already)."""


# -- the one place SDK exceptions become ours -------------------------------------------
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    requests.RequestException,
    auth_exceptions.TransportError,
    ConnectionError,
    TimeoutError,
)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return exc.code in TRANSIENT_STATUS
    if isinstance(exc, storage_exceptions.InvalidResponse):
        return getattr(exc.response, "status_code", None) in TRANSIENT_STATUS
    # A checksum mismatch is a corrupted transfer: sending it again is the cure.
    return isinstance(exc, (*_TRANSPORT_ERRORS, storage_exceptions.DataCorruption))


def _translate(exc: BaseException, what: str) -> BackendError | None:
    """Our error for an SDK or transport failure; None for anything else (our own bugs)."""
    if isinstance(exc, api_exceptions.NotFound):
        return ObjectNotFound(what)
    if isinstance(exc, api_exceptions.PreconditionFailed):
        return PreconditionFailed(what)
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return BackendError(f"{what}: GCS answered {exc.code} {exc.message}")
    if isinstance(exc, storage_exceptions.InvalidResponse):
        status = getattr(exc.response, "status_code", "?")
        return BackendError(f"{what}: unexpected GCS response {status}")
    if isinstance(exc, (*_TRANSPORT_ERRORS, auth_exceptions.GoogleAuthError, OSError)):
        return BackendError(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, storage_exceptions.DataCorruption):
        return BackendError(f"{what}: checksum mismatch: {exc}")
    return None


class Calls:
    """Runs SDK calls: bounded attempts, backoff with jitter, a total time budget."""

    def __init__(self, timeout: float, max_attempts: int) -> None:
        self.timeout = (min(CONNECT_TIMEOUT, timeout), timeout)
        self._budget = timeout
        self._max_attempts = max_attempts

    def run(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        started = time.monotonic()
        backoff = FIRST_BACKOFF
        for attempt in range(1, self._max_attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                error = _translate(exc, what)
                if error is None:
                    raise
                pause = backoff / 2 + random.uniform(0, backoff / 2)
                out_of_time = time.monotonic() - started + pause > self._budget
                if not _is_transient(exc) or attempt == self._max_attempts or out_of_time:
                    raise error from exc
            time.sleep(pause)
            backoff = min(backoff * 2, MAX_BACKOFF)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


# -- credentials and the client ---------------------------------------------------------
def open_credentials(credentials_file: Path | None, anonymous: bool) -> tuple[Credentials, str | None]:
    """Anonymous (emulators), a service account key file, or the default chain."""
    try:
        if anonymous:
            return AnonymousCredentials(), None
        if credentials_file is not None:
            # A service account key only: other credential types (external accounts,
            # impersonation) go through GOOGLE_APPLICATION_CREDENTIALS and the default chain.
            key = service_account.Credentials.from_service_account_file(str(credentials_file), scopes=SCOPES)
            return key, key.project_id
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            # The SDK's own convention: an emulator needs no credentials.
            return AnonymousCredentials(), None
        creds, project = google.auth.default(scopes=SCOPES)
        return creds, project
    except (auth_exceptions.GoogleAuthError, OSError, ValueError, KeyError) as exc:
        raise BackendError(f"GCS credentials: {type(exc).__name__}: {exc}") from exc


def open_client(creds: Credentials, project: str | None, endpoint: str | None) -> storage.Client:
    options = ClientOptions(api_endpoint=endpoint) if endpoint else None
    client = storage.Client(project=project, credentials=creds, client_options=options)
    # The SDK fetches bucket metadata in a background thread on first use only to label
    # OpenTelemetry spans, retrying for up to 120 s when the store is down; we do not
    # trace through the SDK, so switch that off for this client.
    if hasattr(client, "_bucket_metadata_cache"):
        client._bucket_metadata_cache = None
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
    client._http.mount("https://", adapter)
    client._http.mount("http://", adapter)
    return client
