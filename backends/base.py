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

Staged uploads (chunked pushes). A staged upload is named by the *final key* of the
object it will become (the engine picks a fresh key for every upload), so a store
that can stage in place does so and ``commit`` never copies bytes (an S3 multipart
upload on the key, Azure blocks staged on the blob, a GCS resumable session).

The backend keeps no bookkeeping of its own about a staged upload: ``create_staged``
and every ``StagedWriter.flush`` return a small opaque *state token* (a str, at most a
few KiB: part numbers and ETags, block ids, a session URL, a size) that the engine
stores in the same transaction that acknowledges the chunk to the client, and hands
back to ``open_staged``. So what the store holds and what the client was told always
agree: bytes written after the last acknowledged token (a request that died, or a
crash between ``flush`` and the engine's commit) are simply not part of the upload,
and the next writer overwrites or ignores them. A staged upload can be reopened by any
process or node, in any order of requests.

``create_staged(key) -> token``
    Start an empty staged upload that will become ``key``.
``open_staged(key, token)``
    A context manager yielding a ``StagedWriter`` positioned at the end of the bytes
    the token describes. Writers of one upload must not overlap; the engine serialises
    them, and a backend detects what it cheaply can (the filesystem takes an ``flock``
    and raises ``StagedBusy``; S3 refuses to complete parts whose ETags changed).
``abort_staged(key)``
    Remove everything of the staged upload (idempotent; works without the token, so
    leftovers found by ``list_staged`` can be cleaned up after a crash).
``list_staged()``
    Every staged upload still present (``ObjectInfo.key`` is its final key), so that
    uploads whose session is gone can be aborted.
``StagedWriter.commit(metadata)``
    Turn the staged bytes up to the last ``flush`` into the object atomically: it
    appears whole, with ``metadata``, or not at all. Call only after ``flush``.

Errors: every failure of the store (unreachable, throttled after retries, timed out)
is a ``BackendError``; a backend maps its SDK's exceptions to these in one place.

Optional capabilities are separate Protocols (``LocalPaths``, ``PresignedURLs``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

# A segment never starts with ".", so "." and ".." segments cannot match either.
_KEY_MATCHES = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*").fullmatch


def check_key(key: str) -> str:
    """Every backend accepts exactly these keys: no empty, ``.`` or ``..`` segments, no odd bytes.
    (One regex match: a GC checks every key it lists or deletes.)"""
    if len(key) > 1024 or not _KEY_MATCHES(key):
        raise ValueError(f"invalid object key {key!r}")
    return key


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
    """An open staged upload, positioned at the end of the bytes its token describes."""

    @property
    def size(self) -> int:
        """Bytes in the upload so far: the token's bytes plus what was written since."""
        ...

    def write(self, data: bytes) -> None:
        """Append ``data`` (the backend buffers up to its part size, never unboundedly)."""
        ...

    def flush(self) -> str:
        """Make everything written durable and return the token that describes it."""
        ...

    def commit(self, metadata: Mapping[str, str]) -> None:
        """Make the flushed bytes the object at the upload's key, atomically."""
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

    def create_staged(self, key: str) -> str: ...

    def open_staged(self, key: str, token: str) -> AbstractContextManager[StagedWriter]: ...

    def abort_staged(self, key: str) -> None: ...

    def list_staged(self) -> Iterator[ObjectInfo]: ...

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


@runtime_checkable
class DeletesInBackground(Protocol):
    """Capability: a batch delete that runs while the caller goes on (the filesystem's runs
    in a helper process, off the GIL); the returned call waits and gives the failed keys."""

    def start_delete_many(self, keys: list[str], gently: bool = False) -> Callable[[], list[str]]:
        """``gently``: requests are writing, so use little of the disk (e.g. one delete at a time)."""
        ...


@runtime_checkable
class ListsNames(Protocol):
    """Capability: keys can be listed more cheaply than ``list`` (no size or time per object),
    e.g. directory entries without a ``stat`` each; the GC's leak scan stats only strangers."""

    def list_names(self, prefix: str = "") -> Iterator[str]: ...
