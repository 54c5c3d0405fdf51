"""The two ends of a copy: this registry's engine, or a remote registry over HTTP.

The copy protocol (``copier``) reads from one ``Side`` and writes to another, so push
mode (engine → remote) and pull mode (remote → engine) are the same code. A side
answers in the registry's own words; transfers of blob bytes take a ``Transfer``, the
worker's handle on the job, which resumes an interrupted upload and records progress.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from cargohold.engine import Registry
from cargohold.engine.errors import BlobUnknown, BlobUploadUnknown, ManifestUnknown, NameUnknown
from cargohold.engine.manifests import OCI_INDEX, parse_manifest
from cargohold.replication.client import RegistryClient, RemoteError, UploadSession

ReadRange = Callable[[int, int], Iterator[bytes]]  # bytes [start, end) of the blob being copied


@dataclass(frozen=True)
class Fetched:
    digest: str
    media_type: str
    data: bytes


class Transfer(Protocol):
    """What a side needs from the running job while it moves a blob's bytes."""

    chunk_size: int

    def resume_point(self, digest: str) -> dict[str, Any] | None:
        """The upload state saved by an earlier attempt at this digest, if any."""

    def save(self, state: dict[str, Any] | None) -> None:
        """Durably note where the upload stands (the job's progress); renews the job's lease."""

    def metered(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """Count (and throttle) the bytes as they go out; stops when the worker is stopping."""


class Side(Protocol):
    name: str

    def manifest(self, repository: str, reference: str) -> Fetched | None: ...
    def manifest_digest(self, repository: str, reference: str) -> str | None: ...
    def tags(self, repository: str) -> list[str]: ...
    def referrers(self, repository: str, digest: str) -> list[dict[str, Any]]: ...
    def read_blob(self, repository: str, digest: str, start: int, end: int) -> Iterator[bytes]: ...
    def has_blob(self, repository: str, digest: str) -> bool: ...
    def mount_blob(self, repository: str, digest: str) -> bool: ...
    def upload_blob(
        self, repository: str, digest: str, size: int, read: ReadRange, transfer: Transfer
    ) -> None: ...
    def blob_arrived(self, repository: str, digest: str) -> None: ...
    def put_manifest(
        self, repository: str, reference: str, fetched: Fetched, subject: str | None
    ) -> None: ...
    def delete_manifest(self, repository: str, digest: str) -> bool: ...
    def delete_tag(self, repository: str, tag: str) -> bool: ...


class LocalSide:
    """This registry, through the engine's facade."""

    name = "local"

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def manifest(self, repository: str, reference: str) -> Fetched | None:
        try:
            found = self.registry.get_manifest(repository, reference, record_pull=False)
        except (ManifestUnknown, NameUnknown):
            return None
        assert found.data is not None
        return Fetched(found.digest, found.media_type, found.data)

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        try:
            return self.registry.get_manifest(repository, reference, with_data=False).digest
        except (ManifestUnknown, NameUnknown):
            return None

    def tags(self, repository: str) -> list[str]:
        found: list[str] = []
        last = None
        while True:
            try:
                page = self.registry.list_tags(repository, 1000, last)
            except NameUnknown:
                return found
            found.extend(page.items)
            if not page.more or not page.items:
                return found
            last = page.items[-1]

    def repositories(self) -> list[str]:
        found: list[str] = []
        last = None
        while True:
            page = self.registry.list_repositories(1000, last)
            found.extend(page.items)
            if not page.more or not page.items:
                return found
            last = page.items[-1]

    def referrers(self, repository: str, digest: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        last = None
        while True:
            page = self.registry.referrers(repository, digest, None, last, 1000)
            found.extend(page.items)
            if not page.more or not page.items:
                return found
            last = page.items[-1]["digest"]

    def read_blob(self, repository: str, digest: str, start: int, end: int) -> Iterator[bytes]:
        return self.registry.open_blob(repository, digest).read(start, end)

    def has_blob(self, repository: str, digest: str) -> bool:
        try:
            self.registry.stat_blob(repository, digest)
            return True
        except BlobUnknown:
            return False

    def mount_blob(self, repository: str, digest: str) -> bool:
        # Global dedup: any repository of this registry holding the digest will do.
        return self.registry.mount_blob(repository, digest, None) is not None

    def upload_blob(
        self, repository: str, digest: str, size: int, read: ReadRange, transfer: Transfer
    ) -> None:
        offset, upload_id = 0, None
        saved = transfer.resume_point(digest)
        if saved is not None and saved.get("repository") == repository:
            try:
                offset = self.registry.upload_status(repository, saved["upload"]).size
                upload_id = saved["upload"]
            except (BlobUploadUnknown, NameUnknown):
                pass
        if upload_id is None:
            upload_id = self.registry.start_upload(repository, digest.partition(":")[0]).id
            if size > transfer.chunk_size:  # one request or more: only then is there a place to resume
                transfer.save({"digest": digest, "repository": repository, "upload": upload_id})
        while size - offset > transfer.chunk_size:
            length = transfer.chunk_size
            chunks = transfer.metered(read(offset, offset + length))
            offset = self.registry.append_upload(
                repository, upload_id, chunks, start=offset, length=length
            ).size
            transfer.save({"digest": digest, "repository": repository, "upload": upload_id})
        tail = transfer.metered(read(offset, size)) if offset < size else iter(())
        self.registry.finish_upload(repository, upload_id, digest, tail, start=offset, length=size - offset)

    def blob_arrived(self, repository: str, digest: str) -> None:
        pass

    def put_manifest(self, repository: str, reference: str, fetched: Fetched, subject: str | None) -> None:
        self.registry.put_manifest(repository, reference, fetched.data, fetched.media_type)

    def delete_manifest(self, repository: str, digest: str) -> bool:
        try:
            self.registry.delete_manifest(repository, digest, force=True)  # the registry's own job
            return True
        except (ManifestUnknown, NameUnknown):
            return False

    def delete_tag(self, repository: str, tag: str) -> bool:
        return self.delete_manifest(repository, tag)


class SentBlobs(Protocol):
    """Where each digest was last sent on a target (kept in the metadata store)."""

    def where(self, digest: str) -> str | None: ...
    def remember(self, digest: str, repository: str) -> None: ...


class RemoteSide:
    """A remote registry. Blob uploads are chunked and resumable: the upload URL and the
    acknowledged offset are saved in the job after every chunk, and a retry asks the target
    where the upload stands (``GET`` on the upload URL) and goes on from there."""

    def __init__(self, name: str, client: RegistryClient, sent: SentBlobs) -> None:
        self.name = name
        self.client = client
        self.sent = sent
        self._offered: dict[tuple[str, str], UploadSession] = {}  # upload sessions a failed mount opened
        self._referrer_locks: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def manifest(self, repository: str, reference: str) -> Fetched | None:
        found = self.client.manifest(repository, reference)
        return Fetched(found.digest, found.media_type, found.data) if found else None

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        return self.client.manifest_digest(repository, reference)

    def tags(self, repository: str) -> list[str]:
        return self.client.tags(repository)

    def repositories(self) -> list[str]:
        return self.client.repositories()

    def referrers(self, repository: str, digest: str) -> list[dict[str, Any]]:
        found = self.client.referrers(repository, digest)
        if found is not None:
            return found
        # No referrers API: the OCI referrers tag schema (an index tagged sha256-<hex>).
        index = self.client.manifest(repository, _referrers_tag(digest))
        return _index_entries(index.data) if index is not None else []

    def read_blob(self, repository: str, digest: str, start: int, end: int) -> Iterator[bytes]:
        return self.client.read_blob(repository, digest, start, end)

    def has_blob(self, repository: str, digest: str) -> bool:
        return self.client.has_blob(repository, digest)

    def mount_blob(self, repository: str, digest: str) -> bool:
        source = self.sent.where(digest)
        if source is None or source == repository:
            return False
        result = self.client.mount_blob(repository, digest, source)
        if result.session is not None:
            with self._lock:
                self._offered[(repository, digest)] = result.session
        return result.mounted

    def upload_blob(
        self, repository: str, digest: str, size: int, read: ReadRange, transfer: Transfer
    ) -> None:
        session = self._resume(repository, digest, transfer)
        if session is None:
            with self._lock:
                session = self._offered.pop((repository, digest), None)
            session = session or self.client.start_upload(repository)
            if size > transfer.chunk_size:  # a blob sent in one request has no place to resume from
                transfer.save({"digest": digest, "repository": repository, "upload": session.location})
        while size - session.offset > transfer.chunk_size:
            length = transfer.chunk_size
            session = self.client.append(
                session, transfer.metered(read(session.offset, session.offset + length)), length
            )
            transfer.save({"digest": digest, "repository": repository, "upload": session.location})
        remaining = size - session.offset
        tail = transfer.metered(read(session.offset, size)) if remaining else iter(())
        try:
            self.client.finish(session, digest, tail, remaining)
        except RemoteError as exc:
            if exc.status == 400:  # the target's bytes do not add up: the next attempt starts over
                transfer.save(None)
            raise

    def _resume(self, repository: str, digest: str, transfer: Transfer) -> UploadSession | None:
        saved = transfer.resume_point(digest)
        if saved is None or saved.get("repository") != repository:
            return None
        return self.client.upload_status(saved["upload"])

    def blob_arrived(self, repository: str, digest: str) -> None:
        self.sent.remember(digest, repository)

    def put_manifest(self, repository: str, reference: str, fetched: Fetched, subject: str | None) -> None:
        response = self.client.put_manifest(repository, reference, fetched.data, fetched.media_type)
        stored = response.headers.get("docker-content-digest")
        if stored is not None and stored != fetched.digest:
            raise ValueError(f"{self.name} stored {reference} as {stored}, not {fetched.digest}")
        if subject is not None and "oci-subject" not in response.headers:
            # No referrers API there: list the referrer in the sha256-<hex> tag, as OCI clients do.
            self._add_to_referrers_tag(repository, subject, fetched)

    def _add_to_referrers_tag(self, repository: str, subject: str, fetched: Fetched) -> None:
        with self._lock:
            lock = self._referrer_locks.setdefault((repository, subject), threading.Lock())
        with lock:
            tag = _referrers_tag(subject)
            current = self.client.manifest(repository, tag)
            entries = _index_entries(current.data) if current is not None else []
            if any(entry.get("digest") == fetched.digest for entry in entries):
                return
            parsed = parse_manifest(fetched.data, fetched.media_type)
            entry: dict[str, Any] = {
                "mediaType": fetched.media_type,
                "digest": fetched.digest,
                "size": len(fetched.data),
            }
            if parsed.artifact_type:
                entry["artifactType"] = parsed.artifact_type
            if parsed.annotations:
                entry["annotations"] = parsed.annotations
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*entries, entry]}
            self.client.put_manifest(repository, tag, json.dumps(index).encode(), OCI_INDEX)

    def delete_manifest(self, repository: str, digest: str) -> bool:
        return self.client.delete_manifest(repository, digest)

    def delete_tag(self, repository: str, tag: str) -> bool:
        return self.client.delete_manifest(repository, tag)


def _referrers_tag(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}-{encoded}"


def _index_entries(data: bytes) -> list[dict[str, Any]]:
    try:
        manifests = json.loads(data).get("manifests") or []
    except (ValueError, AttributeError):
        return []
    return [entry for entry in manifests if isinstance(entry, dict)]
