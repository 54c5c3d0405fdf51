"""The backend contract: a byte store with keys, nothing more.

A backend knows nothing of digests, manifests or SQLite. Keys are ``/``-separated
strings chosen by the engine (see ``cargohold.engine.layout``); a backend must accept
any key made of ``[A-Za-z0-9._/-]`` and must never let a key escape its root.

Verbs and their promises:

``put(key, chunks, metadata)``
    Write the whole object atomically: readers see the old object (or nothing) until
    the new one is complete, never a prefix. ``metadata`` (small str→str) travels
    with the object so a bucket can be audited without the database. Returns the size.
``read(key, start, end)``
    Stream bytes ``[start, end)`` (``end=None``: to the end). The object is opened
    *eagerly*: ``ObjectNotFound`` or ``BackendError`` is raised by the call itself, not
    by the first ``next()``, so the registry can still answer 404/503 before it starts a
    response. Never reads the whole object into memory.
``stat(key)``
    Size and modification time, or ``ObjectNotFound``.
``delete(key)`` / ``delete_many(keys)``
    Idempotent: a missing key is not an error. ``delete_many`` returns the keys it
    could not delete.
``list(prefix)``
    Every object whose key starts with ``prefix``, in no particular order, paged
    internally by the backend.

Staged uploads (chunked pushes) live beside the objects and become an object only
on ``StagedWriter.commit``. A staged upload is addressed by an id and may be reopened
by any process (or node). The engine opens a staged upload only while it holds that
upload's lease, so writers normally never overlap; a backend still keeps its staged
state so that an overlap cannot go unnoticed (the filesystem takes an ``flock`` and
raises ``StagedBusy``; object stores record their parts and commit that record with a
compare-and-swap). What ``flush`` returned is what ``commit`` assembles: bytes past the
last flush may be lost in a crash, and ``truncate`` drops anything past the size the
engine acknowledged.

Errors: every failure of the store (unreachable, throttled after retries, timed out)
is a ``BackendError``; a backend maps its SDK's exceptions to these in one place.

Optional capabilities are separate Protocols (``LocalPaths``, ``PresignedURLs``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_key(key: str) -> str:
    """Every backend accepts exactly these keys: no empty, ``.`` or ``..`` segments, no odd bytes."""
    if len(key) > 1024 or not _KEY.fullmatch(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return key


def check_upload_id(upload_id: str) -> str:
    if not _UPLOAD_ID.fullmatch(upload_id) or upload_id in (".", ".."):
        raise ValueError(f"invalid upload id {upload_id!r}")
    return upload_id


class BackendError(Exception):
    """The store failed in a way that is not the caller's fault (I/O error, store down)."""


class ObjectNotFound(BackendError):
    """The key (or staged upload) does not exist."""


class StagedBusy(BackendError):
    """Another writer holds the staged upload."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch


class StagedWriter(Protocol):
    """An open, exclusively held staged upload."""

    @property
    def size(self) -> int:
        """Bytes physically staged now (may exceed what the engine acknowledged after a crash)."""
        ...

    def truncate(self, size: int) -> None:
        """Drop staged bytes past ``size`` (unacknowledged leftovers of a crashed request)."""
        ...

    def write(self, data: bytes) -> None:
        """Append ``data`` at the current end."""
        ...

    def flush(self) -> None:
        """Make what was written durable (it survives a crash of this process or machine)."""
        ...

    def commit(self, key: str, metadata: Mapping[str, str]) -> None:
        """Turn the staged bytes into the object ``key`` atomically and end the staged upload."""
        ...


@runtime_checkable
class Backend(Protocol):
    name: str

    def put(self, key: str, chunks: Iterable[bytes], metadata: Mapping[str, str] | None = None) -> int: ...

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...

    def stat(self, key: str) -> ObjectInfo: ...

    def delete(self, key: str) -> None: ...

    def delete_many(self, keys: Iterable[str]) -> list[str]: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def create_staged(self, upload_id: str) -> None:
        """Create an empty staged upload."""
        ...

    def open_staged(self, upload_id: str) -> AbstractContextManager[StagedWriter]: ...

    def read_staged(self, upload_id: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...

    def abort_staged(self, upload_id: str) -> None:
        """Remove a staged upload and its bytes; idempotent."""
        ...

    def list_staged(self) -> Iterator[ObjectInfo]:
        """Every staged upload (``key`` is the upload id), for cleaning up after crashes."""
        ...

    def check(self) -> None:
        """Raise ``BackendError`` if the store cannot be reached (readiness probes)."""
        ...


@runtime_checkable
class PresignedURLs(Protocol):
    """Capability: a short-lived URL from which a client may GET the object directly."""

    def presigned_url(self, key: str, expires_seconds: int) -> str: ...


@runtime_checkable
class LocalPaths(Protocol):
    """Capability: objects are plain local files, so the server may send them with sendfile."""

    def local_path(self, key: str) -> Path: ...
