"""Upload sessions: from the first byte of a push to a verified, visible blob.

A session's row holds everything needed to continue it anywhere: the acknowledged
size, the backend's staged-upload token and the serialised hash state. They change
together in the one transaction that acknowledges a chunk, so what the store holds,
what the hash covers and what the client was told always agree, whatever process
or node the next request lands on and whatever crashed in between.

Finishing an upload verifies the digest *before* the blob becomes visible, then
either drops the bytes (the digest is already stored: global dedup) or commits the
staged bytes to the key chosen when the upload started (never a copy).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from cargohold.backends.base import Backend, BackendError, ObjectNotFound, StagedBusy
from cargohold.engine import layout
from cargohold.engine.digests import check_algorithm, parse_digest
from cargohold.engine.errors import (
    BlobUploadUnknown,
    DigestInvalid,
    QuotaExceeded,
    RangeInvalid,
    SizeInvalid,
    StorageUnavailable,
    UploadBusy,
)
from cargohold.engine.hashing import ContentHasher, HashStates, hash_stream
from cargohold.engine.metadata import MetadataStore, UploadRow
from cargohold.engine.names import check_name
from cargohold.engine.quotas import Quotas

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UploadState:
    id: str
    repository: str
    size: int


@dataclass(frozen=True, slots=True)
class StoredBlob:
    digest: str
    size: int


def staged_call(fn: Callable[..., Any], *args: Any) -> Any:
    """A call on an open staged upload: its bytes having vanished means the session is gone."""
    try:
        return backend_call(fn, *args)
    except ObjectNotFound:
        raise BlobUploadUnknown("the staged bytes of this upload are gone; start again") from None


def backend_call(fn: Callable[..., Any], *args: Any) -> Any:
    """Call the backend; a store failure becomes a 503 for the client, not a 500."""
    try:
        return fn(*args)
    except ObjectNotFound:
        raise
    except (BackendError, OSError) as exc:
        log.exception("backend call %s failed", getattr(fn, "__name__", fn))
        raise StorageUnavailable(f"storage backend error: {exc}") from exc


class UploadSessions:
    def __init__(
        self, store: MetadataStore, backend: Backend, expiry_seconds: float, quotas: Quotas | None = None
    ) -> None:
        self.store = store
        self.backend = backend
        self.expiry_seconds = expiry_seconds
        self.quotas = quotas
        self._hashes = HashStates()

    def start(self, repository: str, algorithm: str = "sha256") -> UploadState:
        check_name(repository)
        check_algorithm(algorithm)
        upload_id = layout.new_copy_id()
        key = layout.blob_key(upload_id)
        token = backend_call(self.backend.create_staged, key)
        now = time.time()
        with self.store.write() as conn:
            repo_id = self.store.ensure_repository(conn, repository)
            self.store.create_upload(
                conn, upload_id, repo_id, algorithm, key, token, now, now + self.expiry_seconds
            )
        return UploadState(upload_id, repository, 0)

    def status(self, repository: str, upload_id: str) -> UploadState:
        row = self._session(repository, upload_id)
        return UploadState(row.id, repository, row.size)

    def append(
        self,
        repository: str,
        upload_id: str,
        chunks: Iterable[bytes],
        start: int | None = None,
        length: int | None = None,
    ) -> UploadState:
        """Append a chunk; ``start`` (from Content-Range) must be where the upload ends."""
        row = self._session(repository, upload_id)
        with self._open(row) as writer:
            hasher = self._receive(writer, row, chunks, start, length)
            token = staged_call(writer.flush)
            self._acknowledge(row, writer.size, token, hasher)
        return UploadState(row.id, repository, writer.size)

    def finish(
        self,
        repository: str,
        upload_id: str,
        digest: str,
        chunks: Iterable[bytes] = (),
        start: int | None = None,
        length: int | None = None,
    ) -> StoredBlob:
        """Receive the last chunk, verify the digest, and make the blob visible in the repository."""
        expected = parse_digest(digest)
        row = self._session(repository, upload_id)
        with self._open(row) as writer:
            hasher = self._receive(writer, row, chunks, start, length)
            staged_call(writer.flush)
            actual, checksum = hasher.finish()
            committed = False
            if expected.algorithm != row.algorithm:
                # The client announced one algorithm and finished with another: commit the
                # bytes to their key (invisible: no row names it yet) and hash them there.
                staged_call(writer.commit, {"digest": str(expected)})
                committed, checksum = True, None
                actual = hash_stream(expected.algorithm, backend_call(self.backend.read, row.storage_key))
            if actual != str(expected):
                if committed:
                    backend_call(self.backend.delete, row.storage_key)
                self.discard(row)
                raise DigestInvalid(detail={"expected": str(expected), "actual": actual})
            self._hashes.drop(row.id)
            blob = StoredBlob(str(expected), writer.size)
            self._make_visible(row, blob, checksum, None if committed else writer)
        return blob

    def _make_visible(self, row: UploadRow, blob: StoredBlob, checksum: str | None, writer: Any) -> None:
        """Link the verified blob to the repository, storing our copy only if it is needed."""
        now = time.time()
        try:
            with self.store.write() as conn:
                existing = self.store.blob(conn, blob.digest)
                if existing is not None and existing.state == "live":
                    # Global dedup: the digest is stored already; link it and drop our bytes.
                    with self._quota_guard(conn, row.repository, now):
                        self.store.link_blob(conn, row.repository_id, blob.digest, now)
                    self.store.delete_upload(conn, row.id)
                    duplicate = True
                else:
                    if self.quotas is not None:  # refused before the bytes are committed
                        self.quotas.check_blob(conn, row.repository, blob.digest, blob.size)
                    duplicate = False
        except QuotaExceeded:
            self.discard(row)
            raise
        if duplicate:
            if writer is None:
                backend_call(self.backend.delete, row.storage_key)
            else:
                backend_call(self.backend.abort_staged, row.storage_key)
            return
        if writer is not None:
            staged_call(writer.commit, {"digest": blob.digest})
        try:
            with self.store.write() as conn:
                # Someone may have stored the digest meanwhile: then our copy is the redundant one.
                redundant = self.store.store_blob(
                    conn, blob.digest, row.storage_key, blob.size, checksum, now
                )
                with self._quota_guard(conn, row.repository, now):
                    self.store.link_blob(conn, row.repository_id, blob.digest, now)
                self.store.delete_upload(conn, row.id)
                if redundant is not None:
                    self.store.queue_object_deletion(conn, redundant, blob.digest, now, blob.size)
        except QuotaExceeded:
            # A concurrent push took the room first: our committed copy is named by no row.
            with self.store.write() as conn:
                self.store.delete_upload(conn, row.id)
            backend_call(self.backend.delete, row.storage_key)
            raise
        if redundant is not None:
            self.delete_doomed([redundant])

    def _quota_guard(self, conn: Any, repository: str, now: float) -> AbstractContextManager[None]:
        return self.quotas.guard(conn, repository, now) if self.quotas is not None else nullcontext()

    def delete_doomed(self, keys: list[str]) -> None:
        """Delete physical copies queued for deletion, and forget the ones that went."""
        failed = set(self.backend.delete_many(keys))
        done = [k for k in keys if k not in failed]
        if done:
            with self.store.write() as conn:
                self.store.forget_doomed(conn, done)

    def cancel(self, repository: str, upload_id: str) -> None:
        self.discard(self._session(repository, upload_id))

    def discard(self, row: UploadRow) -> None:
        with self.store.write() as conn:
            self.store.delete_upload(conn, row.id)
        self._hashes.drop(row.id)
        backend_call(self.backend.abort_staged, row.storage_key)

    def expire(self, now: float | None = None, staged_grace_seconds: float | None = None) -> int:
        """Remove expired sessions, and staged uploads no session owns (crash leftovers)."""
        now = time.time() if now is None else now
        with self.store.write() as conn:
            expired = self.store.expired_uploads(conn, now)
            for upload_id, _key in expired:
                self.store.delete_upload(conn, upload_id)
        for upload_id, key in expired:
            self._hashes.drop(upload_id)
            backend_call(self.backend.abort_staged, key)
        grace = self.expiry_seconds if staged_grace_seconds is None else staged_grace_seconds
        stale = [info.key for info in self.backend.list_staged() if info.modified < now - grace]
        owned = self.store.upload_keys(self.store.read(), stale)
        orphans = [key for key in stale if key not in owned]
        for key in orphans:
            backend_call(self.backend.abort_staged, key)
        return len(expired) + len(orphans)

    # -- internals -----------------------------------------------------------------------
    def _session(self, repository: str, upload_id: str) -> UploadRow:
        check_name(repository)
        row = self.store.upload(self.store.read(), upload_id)
        if row is None or row.repository != repository or row.expires_at < time.time():
            raise BlobUploadUnknown(detail={"uuid": upload_id[:64]})
        return row

    def _open(self, row: UploadRow) -> _StagedClaim:
        return _StagedClaim(self.backend, row)

    def _receive(
        self, writer: Any, row: UploadRow, chunks: Iterable[bytes], start: int | None, length: int | None
    ) -> ContentHasher:
        """Check the chunk starts where the upload ends, then hash and stage its bytes."""
        if start is not None and start != row.size:
            raise RangeInvalid(
                "chunk does not start where the upload ends", size=row.size, upload_offset=row.size
            )
        hasher = self._hashes.resume(row.id, row.algorithm, row.size, row.hash_state)
        received = 0
        try:
            if self.quotas is not None:  # refused before the bytes are stored, where the length says so
                chunks = self.quotas.admit(row.repository, chunks, row.size, length)
            for chunk in chunks:
                if length is not None and received + len(chunk) > length:
                    raise SizeInvalid("request body is longer than its declared length")
                hasher.update(chunk)
                staged_call(writer.write, chunk)
                received += len(chunk)
        except QuotaExceeded:
            self.discard(row)  # the blob cannot fit: nothing of it stays
            raise
        if length is not None and received != length:
            raise SizeInvalid(f"expected {length} bytes, received {received}")
        return hasher

    def _acknowledge(self, row: UploadRow, new_size: int, token: str, hasher: ContentHasher) -> None:
        now = time.time()
        with self.store.write() as conn:
            moved = self.store.advance_upload(
                conn, row, new_size, token, hasher.state(), now, now + self.expiry_seconds
            )
        if not moved:
            self._hashes.drop(row.id)
            raise BlobUploadUnknown("the upload session changed or ended during this request")
        self._hashes.save(row.id, new_size, hasher)


class _StagedClaim:
    """Opens the session's staged upload, with the backend's errors in the registry's words."""

    def __init__(self, backend: Backend, row: UploadRow) -> None:
        self._backend = backend
        self._row = row
        self._cm: Any = None

    def __enter__(self) -> Any:
        try:
            self._cm = self._backend.open_staged(self._row.storage_key, self._row.staged_state)
            return self._cm.__enter__()
        except StagedBusy:
            raise UploadBusy(size=self._row.size, upload_offset=self._row.size) from None
        except ObjectNotFound:
            raise BlobUploadUnknown("the staged bytes of this upload are gone; start again") from None
        except (BackendError, OSError) as exc:
            raise StorageUnavailable(f"storage backend error: {exc}") from exc

    def __exit__(self, *exc: Any) -> Any:
        return self._cm.__exit__(*exc)
