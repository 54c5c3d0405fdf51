"""The blob engine: the registry's operations in its own words, and every invariant.

The API, the GC and replication call only this. It is synchronous (sqlite3 and the
object-store SDKs are); the async API calls it from a thread pool.

Invariants kept here (see the design notes):
  1. Bytes are verified against their digest before a blob becomes visible.
  2. One stored copy per digest across repositories; a repository serves only blobs linked to it.
  3. Each stored copy has its own key (``layout``); finishing an upload never copies bytes.
  4. Refcounts change in the same transaction as the rows they count (``metadata``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cargohold.backends.base import (
    Backend,
    BackendError,
    LocalPaths,
    ObjectNotFound,
    PresignedURLs,
)
from cargohold.engine.activity import ActivityRecorder
from cargohold.engine.backup import BackupResult, backup
from cargohold.engine.collection import Collection
from cargohold.engine.digests import digest_bytes, is_digest, parse_digest
from cargohold.engine.errors import (
    BlobUnknown,
    DeletesDisabled,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestTooLarge,
    ManifestUnknown,
    NameUnknown,
    StorageUnavailable,
)
from cargohold.engine.events import EventLog
from cargohold.engine.fsck import FsckReport, fsck
from cargohold.engine.immutability import ImmutableTagRule, ImmutableTags, Override
from cargohold.engine.jobs import JobLedger
from cargohold.engine.maintenance import ReadOnlySwitch
from cargohold.engine.manifests import parse_manifest
from cargohold.engine.metadata import Conn, MetadataStore, NewManifest, ReferrerRow
from cargohold.engine.names import check_name, check_tag
from cargohold.engine.pullthrough import namespace_of
from cargohold.engine.quotas import Quota, Quotas
from cargohold.engine.scrub import ScrubReport, scrub
from cargohold.engine.uploads import UploadSessions, UploadState, backend_call
from cargohold.engine.usage import Usage, measure

log = logging.getLogger(__name__)

MAX_PAGE = 10_000
CATALOG_SCAN_BUDGET = 20_000  # names one filtered catalog request may look at


@dataclass(frozen=True, slots=True)
class RegistryLimits:
    upload_expiry_seconds: float = 24 * 3600
    manifest_max_bytes: int = 4 * 1024 * 1024
    delete_enabled: bool = True
    # Answer blob GETs with a redirect to a presigned URL, where the backend can sign.
    redirect_pulls: bool = False
    redirect_expiry_seconds: int = 1200
    read_only: bool = False  # the config's default; the admin API can switch it at run time
    pull_event_sample_rate: float = 0.0  # share of manifest pulls recorded as events (0: none)
    # Repository name prefixes that are pull-through caches (``engine.pullthrough``).
    pull_through_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class BlobReader:
    """An open blob: its size and a reader; or a local path (sendfile) or a redirect URL.

    ``read`` opens the stored object before it returns, so a missing object or an
    unreachable store is an error the caller can still answer with a status code.
    """

    digest: str
    size: int
    local_path: Path | None
    _read: Callable[[int, int | None], Iterator[bytes]]
    redirect_url: str | None = None

    def read(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        return self._read(start, end)


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str
    media_type: str
    size: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class PutManifestResult:
    digest: str
    subject: str | None
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Any]
    more: bool
    # Where the next page starts when this one was cut short before it was full (the last
    # name looked at, which the caller may not be allowed to see: see api/cursors.py).
    resume_after: str | None = None


class Registry:
    def __init__(
        self,
        store: MetadataStore,
        backend: Backend,
        limits: RegistryLimits | None = None,
        *,
        immutable_tags: Sequence[ImmutableTagRule] = (),
        quotas: Sequence[Quota] = (),
    ) -> None:
        self.store = store
        self.backend = backend
        self.limits = limits or RegistryLimits()
        self.activity = ActivityRecorder(store)
        self.events = EventLog(store, self.limits.pull_event_sample_rate)
        self.immutable_tags = ImmutableTags(store, immutable_tags)
        self.quotas = Quotas(store, quotas, self.events)
        self.quotas.sync()
        self.uploads = UploadSessions(store, backend, self.limits.upload_expiry_seconds, self.quotas)
        self.collection = Collection(store, backend)
        self.jobs = JobLedger(store)
        self.read_only = ReadOnlySwitch(store, self.limits.read_only)
        self._local_paths = backend if isinstance(backend, LocalPaths) else None
        self._presigner = (
            backend if isinstance(backend, PresignedURLs) and self.limits.redirect_pulls else None
        )

    # ======================================================================= uploads
    def start_upload(self, repository: str, algorithm: str = "sha256") -> UploadState:
        self.read_only.check()
        return self.uploads.start(repository, algorithm)

    def upload_status(self, repository: str, upload_id: str) -> UploadState:
        return self.uploads.status(repository, upload_id)

    def append_upload(
        self,
        repository: str,
        upload_id: str,
        chunks: Iterable[bytes],
        *,
        start: int | None = None,
        length: int | None = None,
    ) -> UploadState:
        self.read_only.check()
        return self.uploads.append(repository, upload_id, chunks, start, length)

    def finish_upload(
        self,
        repository: str,
        upload_id: str,
        digest: str,
        chunks: Iterable[bytes] = (),
        *,
        start: int | None = None,
        length: int | None = None,
    ) -> BlobInfo:
        self.read_only.check()
        stored = self.uploads.finish(repository, upload_id, digest, chunks, start, length)
        return BlobInfo(stored.digest, stored.size)

    def cancel_upload(self, repository: str, upload_id: str) -> None:
        self.uploads.cancel(repository, upload_id)

    def expire_uploads(self, now: float | None = None, staged_grace_seconds: float | None = None) -> int:
        return self.uploads.expire(now, staged_grace_seconds)

    def mount_blob(
        self,
        repository: str,
        digest: str,
        source: str | None,
        may_read: Callable[[str], bool] = lambda _name: True,
    ) -> BlobInfo | None:
        """Link a blob another repository holds; None when it cannot (the caller uploads)."""
        self.read_only.check()
        check_name(repository)
        parse_digest(digest)
        with self.store.write() as conn:
            blob = self.store.blob(conn, digest)
            if blob is None or blob.state != "live":
                return None
            if source is not None:
                if not may_read(source) or self.store.linked_blob(conn, source, digest) is None:
                    return None
            elif not any(may_read(name) for name in self.store.repositories_linking(conn, digest)):
                return None
            repo_id = self.store.ensure_repository(conn, repository)
            now = time.time()
            with self.quotas.guard(conn, repository, now):  # a blob new to the namespace counts
                self.store.link_blob(conn, repo_id, digest, now)
        return BlobInfo(digest, blob.size)

    # ========================================================================= blobs
    def stat_blob(self, repository: str, digest: str) -> BlobInfo:
        check_name(repository)
        parse_digest(digest)
        blob = self.store.linked_blob(self.store.read(), repository, digest)
        if blob is not None:
            self.activity.blob_touched(digest)
            return BlobInfo(digest, blob.size)
        manifest = self.store.manifest(self.store.read(), repository, digest, with_data=False)
        if manifest is not None:
            return BlobInfo(digest, manifest.size)
        raise BlobUnknown(detail={"digest": digest})

    def open_blob(self, repository: str, digest: str) -> BlobReader:
        check_name(repository)
        parse_digest(digest)
        blob = self.store.linked_blob(self.store.read(), repository, digest)
        if blob is not None:
            key = blob.storage_key
            path = self._local_paths.local_path(key) if self._local_paths is not None else None
            url = self._redirect_url(key) if self._presigner is not None else None
            return BlobReader(digest, blob.size, path, lambda s, e: self._read_object(key, s, e), url)
        # A manifest is content-addressed too; some clients fetch it through the blob route.
        manifest = self.store.manifest(self.store.read(), repository, digest, with_data=True)
        if manifest is not None and manifest.data is not None:
            data = manifest.data
            return BlobReader(digest, len(data), None, lambda s, e: iter((data[s:e],)))
        raise BlobUnknown(detail={"digest": digest})

    def _redirect_url(self, key: str) -> str | None:
        """A signed URL for the client, or None to stream the bytes ourselves: a store that
        cannot sign (anonymous or identity-based credentials) must not turn pulls into 503s."""
        assert self._presigner is not None
        try:
            return self._presigner.presigned_url(key, self.limits.redirect_expiry_seconds)
        except BackendError as exc:
            log.warning("cannot sign a redirect for %s (%s); streaming instead", key, exc)
            return None

    def delete_blob(self, repository: str, digest: str) -> None:
        self.read_only.check()
        self._check_deletes()
        check_name(repository)
        parse_digest(digest)
        with self.store.write() as conn:
            repo_id = self.store.repository_id(conn, repository)
            if repo_id is None or not self.store.unlink_blob(conn, repo_id, digest):
                raise BlobUnknown(detail={"digest": digest})

    def _read_object(self, key: str, start: int, end: int | None) -> Iterator[bytes]:
        try:
            return backend_call(self.backend.read, key, start, end)
        except ObjectNotFound:
            # The row says live but the bytes are gone: never serve a partial or wrong blob.
            log.error("stored object %s is missing", key)
            raise StorageUnavailable("stored blob is missing; run cargohold fsck") from None

    # ===================================================================== manifests
    def put_manifest(
        self,
        repository: str,
        reference: str,
        data: bytes,
        content_type: str | None,
        tags: Iterable[str] = (),
        *,
        lazy_blobs: bool = False,
    ) -> PutManifestResult:
        """``lazy_blobs`` is for a pull-through cache: its blobs may come later, when first
        pulled (child manifests must still be there)."""
        self.read_only.check()
        check_name(repository)
        if len(data) > self.limits.manifest_max_bytes:
            raise ManifestTooLarge(detail={"size": len(data), "limit": self.limits.manifest_max_bytes})
        all_tags = [check_tag(t) for t in tags]
        if is_digest(reference):
            claimed = parse_digest(reference)
            digest = digest_bytes(data, claimed.algorithm)
            if digest != str(claimed):
                raise DigestInvalid(
                    "manifest digest does not match its content",
                    detail={"expected": reference, "actual": digest},
                )
        else:
            all_tags.insert(0, check_tag(reference))
            digest = digest_bytes(data)
        parsed = parse_manifest(data, content_type)
        annotations = json.dumps(parsed.annotations, separators=(",", ":")) if parsed.annotations else None
        new = NewManifest(
            digest=digest,
            media_type=parsed.media_type,
            artifact_type=parsed.artifact_type,
            subject=parsed.subject,
            annotations=annotations,
            data=data,
            blob_refs=[d.digest for d in parsed.blobs],
            manifest_refs=[d.digest for d in parsed.children],
        )
        unique_tags = tuple(dict.fromkeys(all_tags))
        now = time.time()
        with self.store.write() as conn:
            repo_id = self.store.ensure_repository(conn, repository)
            # Checked inside the write transaction: a concurrent GC sweep either tombstoned
            # the blob first (we refuse; the client re-uploads) or it sees our reference.
            missing = [] if lazy_blobs else self.store.missing_blobs(conn, repo_id, new.blob_refs)
            if missing:
                raise ManifestBlobUnknown(detail={"digest": missing[0]})
            self._check_blob_sizes(conn, parsed.blobs)
            missing = self.store.missing_manifests(conn, repo_id, new.manifest_refs)
            if missing:
                raise ManifestBlobUnknown(
                    "index references an unknown manifest", detail={"digest": missing[0]}
                )
            self.immutable_tags.check_tags(conn, repo_id, repository, unique_tags, digest)
            # The outbox row commits (or rolls back) with the change it describes.
            self.events.record_push(conn, repo_id, repository, new, unique_tags, now)
            with self.quotas.guard(conn, repository, now):
                self.store.insert_manifest(conn, repo_id, new, now)
            for tag in unique_tags:
                self.store.set_tag(conn, repo_id, tag, digest, now)
        return PutManifestResult(digest, parsed.subject, unique_tags)

    def _check_blob_sizes(self, conn: Conn, descriptors: Iterable[Any]) -> None:
        for descriptor in descriptors:
            blob = self.store.blob(conn, descriptor.digest)
            if blob is not None and blob.size != descriptor.size:
                raise ManifestInvalid(
                    "descriptor size does not match the stored blob",
                    detail={"digest": descriptor.digest, "size": descriptor.size, "stored": blob.size},
                )

    def get_manifest(
        self, repository: str, reference: str, with_data: bool = True, *, record_pull: bool = True
    ) -> Manifest:
        """``record_pull=False`` for the registry's own reads (replication): they are not pulls."""
        check_name(repository)
        conn = self.store.read()
        if is_digest(reference):
            parse_digest(reference)
            row = self.store.manifest(conn, repository, reference, with_data)
            tag = None
        else:
            tag = check_tag(reference)
            row = self.store.tagged_manifest(conn, repository, tag, with_data)
        if row is None:
            raise ManifestUnknown(detail={"reference": reference})
        if with_data and record_pull:
            self.activity.manifest_pulled(repository, row.digest, tag)
            self.events.record_pull(repository, row.digest, tag, row.media_type)
        return Manifest(row.digest, row.media_type, row.size, row.data)

    def delete_manifest(
        self, repository: str, reference: str, *, force: bool = False, override: Override | None = None
    ) -> None:
        """By digest: the manifest and its tags go. By tag: only the tag goes.

        ``force`` is for the registry's own jobs (GC, retention): they delete even where
        clients may not; immutable tags still hold (``engine.immutability``). ``override`` is
        an admin's explicit override of those too, audit-logged in the same transaction.
        """
        self.read_only.check()
        if not force and override is None:
            self._check_deletes()
        check_name(repository)
        by_digest = is_digest(reference)
        if by_digest:
            parse_digest(reference)
        else:
            check_tag(reference)
        with self.store.write() as conn:
            repo_id = self.store.repository_id(conn, repository)
            if repo_id is None:
                raise NameUnknown(detail={"name": repository})
            if override is None:
                self.immutable_tags.check_delete(conn, repo_id, repository, reference, by_digest)
            else:
                self.immutable_tags.record_override(conn, repo_id, repository, reference, by_digest, override)
            self.events.record_delete(conn, repo_id, repository, reference, by_digest, time.time())
            if by_digest:
                deleted = self.store.delete_manifest(conn, repo_id, reference)
            else:
                deleted = self.store.delete_tag(conn, repo_id, reference)
            if not deleted:
                raise ManifestUnknown(detail={"reference": reference})

    def list_tags(self, repository: str, n: int, last: str | None) -> Page:
        check_name(repository)
        conn = self.store.read()
        repo_id = self.store.repository_id(conn, repository)
        if repo_id is None:
            raise NameUnknown(detail={"name": repository})
        limit = min(n, MAX_PAGE)
        if limit == 0:
            return Page([], False)
        tags = self.store.list_tags(conn, repo_id, last or "", limit + 1)
        return Page(tags[:limit], len(tags) > limit)

    def list_repositories(
        self,
        n: int,
        last: str | None,
        visible: Callable[[str], bool] | None = None,
        scan_budget: int = CATALOG_SCAN_BUDGET,
    ) -> Page:
        """A page of repository names after ``last``; with ``visible``, only the names it
        accepts. Hidden names are skipped from further batches, but at most ``scan_budget``
        names are looked at per call: past that the page ends early with ``resume_after``."""
        limit = min(n, MAX_PAGE)
        if limit == 0:
            return Page([], False)
        if visible is None:
            names = self.store.catalog(self.store.read(), last or "", limit + 1)
            return Page(names[:limit], len(names) > limit)
        shown: list[str] = []
        cursor = last or ""
        scanned = 0
        batch_size = max(limit + 1, min(100, scan_budget))
        while len(shown) <= limit:
            if scanned >= max(scan_budget, limit + 1):
                return Page(shown, True, resume_after=cursor)
            batch = self.store.catalog(self.store.read(), cursor, batch_size)
            scanned += len(batch)
            shown.extend(name for name in batch if visible(name))
            if len(batch) < batch_size:
                break
            cursor = batch[-1]
        return Page(shown[:limit], len(shown) > limit)

    def referrers(
        self, repository: str, digest: str, artifact_type: str | None, last: str | None, page_size: int
    ) -> Page:
        """Manifests in ``repository`` whose subject is ``digest``, as OCI descriptors."""
        check_name(repository)
        parse_digest(digest)
        conn = self.store.read()
        repo_id = self.store.repository_id(conn, repository)
        if repo_id is None:
            return Page([], False)
        rows = self.store.referrers(conn, repo_id, digest, artifact_type, last or "", page_size + 1)
        return Page([_referrer_descriptor(r) for r in rows[:page_size]], len(rows) > page_size)

    # ===================================================================== operations
    def fsck(self, *, repair: bool = False, drop_dangling_tags: bool = False) -> FsckReport:
        """Check that the metadata and the stored bytes agree (``engine.fsck``)."""
        prefixes = self.limits.pull_through_prefixes
        return fsck(
            self.store,
            self.backend,
            repair=repair,
            drop_dangling_tags=drop_dangling_tags,
            lazy_blobs=lambda repository: namespace_of(repository, prefixes) is not None,
        )

    def scrub(
        self, *, full: bool = False, rate_bytes_per_second: float = 0.0, max_seconds: float | None = None
    ) -> ScrubReport:
        """Re-read stored bytes against their checksums (or digests); quarantine bad copies."""
        with self.jobs.exclusive("scrub", ttl=3600):
            run_id = self.jobs.start_run("scrub", False)
            report = scrub(
                self.store,
                self.backend,
                full=full,
                rate_bytes_per_second=rate_bytes_per_second,
                max_seconds=max_seconds,
            )
            status = "succeeded" if not (report.quarantined or report.unreadable) else "found-damage"
            self.jobs.finish_run(run_id, status, report.summary())
        return report

    def backup(self, keep: int = 7) -> BackupResult:
        """A consistent snapshot of the metadata, stored in the backend (``engine.backup``)."""
        with self.jobs.exclusive("backup", ttl=3600):
            run_id = self.jobs.start_run("backup", False)
            result = backup(self.store, self.backend, keep)
            self.jobs.finish_run(run_id, "succeeded", dataclasses.asdict(result))
        return result

    def quarantined_blobs(self) -> int:
        return self.collection.queries.quarantined_blobs(self.store.read())

    def open_uploads(self) -> int:
        return self.collection.queries.open_uploads(self.store.read())

    def usage(self) -> Usage:
        """Bytes per repository (referenced, unique, shared), the store's dedup savings, quotas."""
        return measure(self.store, self.quotas.usage())

    def check(self) -> None:
        """Raise if the metadata store or the backend cannot be reached."""
        self.store.check()
        backend_call(self.backend.check)

    def _check_deletes(self) -> None:
        if not self.limits.delete_enabled:
            raise DeletesDisabled()


def _referrer_descriptor(row: ReferrerRow) -> dict[str, Any]:
    descriptor: dict[str, Any] = {"mediaType": row.media_type, "digest": row.digest, "size": row.size}
    if row.artifact_type:
        descriptor["artifactType"] = row.artifact_type
    if row.annotations:
        descriptor["annotations"] = json.loads(row.annotations)
    return descriptor


__all__ = [
    "BlobInfo",
    "BlobReader",
    "Manifest",
    "Page",
    "PutManifestResult",
    "Registry",
    "RegistryLimits",
    "UploadState",
]
