"""The copy protocol: bring one tag or one manifest of a source in line on a sink.

For a manifest: its children first (an index's manifests, an image's config and layers),
then the manifest, then its referrers, then the tag. Every blob the sink already has is
skipped (HEAD), or linked from another repository there (cross-repository mount) when
it is known to be there; the rest is streamed from the source in ranged reads, in chunks
that the sink acknowledges one by one so an interrupted transfer resumes where it stood.
The sink verifies each digest on arrival (the final PUT names it).

Tag conflicts: the rule's direction decides, and the source is the truth. A receiving
tag that names another digest is moved to the source's. A sink that refuses (an
immutable tag, a denied repository) answers an error that is recorded on the job, which
goes to the dead letters: it is never forced, and never retried until someone acts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from cargohold.engine.manifests import parse_manifest
from cargohold.replication.rules import CompiledRule
from cargohold.replication.sides import Fetched, Side, Transfer

log = logging.getLogger(__name__)
MAX_REFERRER_DEPTH = 4  # signatures of attestations of ... stop somewhere


class SourceChanged(Exception):
    """The source lost something while it was being copied (deleted meanwhile): retry later."""


class Job(Transfer, Protocol):
    """The running job, as the copy sees it: progress, counters, and the stop signal."""

    def count(self, **counts: int) -> None: ...
    def touch(self) -> None: ...


@dataclass
class CopyOutcome:
    """What one copy did (for logs and the CLI)."""

    actions: list[str] = field(default_factory=list)


class KeyedLocks:
    """One lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Hashable, list[Any]] = {}  # key -> [lock, holders and waiters]

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]


class Copier:
    def __init__(
        self, source: Side, sink: Side, rule: CompiledRule, job: Job, blob_locks: KeyedLocks | None = None
    ) -> None:
        self.source = source
        self.sink = sink
        self.rule = rule
        self.job = job
        # Jobs running side by side often share layers (a base image): one sends a blob while the
        # others wait for it, then find it there (HEAD) or mount it, instead of sending it too.
        self.blob_locks = blob_locks or KeyedLocks()
        self.outcome = CopyOutcome()
        self._blobs_done: set[tuple[str, str]] = set()
        self._manifests_done: set[tuple[str, str]] = set()

    # -- the two kinds of job ----------------------------------------------------------------
    def sync_tag(self, repository: str, tag: str) -> CopyOutcome:
        """Make ``tag`` on the sink name what it names on the source (or go, with delete propagation)."""
        destination = self.rule.destination(repository)
        digest = self.source.manifest_digest(repository, tag)
        if digest is None:
            if self.rule.rule.propagate_deletes and self.sink.manifest_digest(destination, tag) is not None:
                self.sink.delete_tag(destination, tag)
                self.outcome.actions.append(f"deleted tag {destination}:{tag}")
            return self.outcome
        fetched = self.source.manifest(repository, digest)
        if fetched is None:
            raise SourceChanged(f"{repository}@{digest} went while {tag} was being copied")
        parsed = parse_manifest(fetched.data, fetched.media_type)
        if not self.rule.covers_artifact(parsed.artifact_type, parsed.media_type):
            self.outcome.actions.append(f"skipped {repository}:{tag} (artifact type {parsed.artifact_type})")
            return self.outcome
        if self.copy_manifest(repository, destination, fetched, tag=tag):
            self.job.count(tags_moved=1)
            self.outcome.actions.append(f"tagged {destination}:{tag} -> {fetched.digest}")
            return self.outcome
        current = self.sink.manifest_digest(destination, tag)
        if current != fetched.digest:
            self.sink.put_manifest(destination, tag, fetched, None)
            self.job.count(tags_moved=1, bytes_sent=len(fetched.data))
            moved = f" (was {current})" if current else ""
            self.outcome.actions.append(f"tagged {destination}:{tag} -> {fetched.digest}{moved}")
        return self.outcome

    def sync_manifest(self, repository: str, digest: str) -> CopyOutcome:
        """A referrer pushed after its subject, or a deleted manifest (with delete propagation)."""
        destination = self.rule.destination(repository)
        fetched = self.source.manifest(repository, digest)
        if fetched is None:
            if (
                self.rule.rule.propagate_deletes
                and self.sink.manifest_digest(destination, digest) is not None
            ):
                self.sink.delete_manifest(destination, digest)
                self.outcome.actions.append(f"deleted {destination}@{digest}")
            return self.outcome
        parsed = parse_manifest(fetched.data, fetched.media_type)
        if parsed.subject is None or not self.rule.covers_referrer(parsed.artifact_type):
            return self.outcome
        if self.sink.manifest_digest(destination, parsed.subject) is None:
            # Its subject is not there (yet): the referrer travels with it when it is copied.
            return self.outcome
        self.copy_manifest(repository, destination, fetched)
        return self.outcome

    # -- manifests ---------------------------------------------------------------------------
    def copy_manifest(
        self, repository: str, destination: str, fetched: Fetched, depth: int = 0, tag: str | None = None
    ) -> bool:
        """Copy a manifest (its tree first, its referrers after); True if that also set ``tag``.

        The tag is set by the manifest's own PUT only when no referrer has to arrive before it
        (the usual image): one request, and the manifest's bytes go once instead of twice.
        """
        if (destination, fetched.digest) in self._manifests_done:
            return False
        self._manifests_done.add((destination, fetched.digest))
        parsed = parse_manifest(fetched.data, fetched.media_type)
        tagged = False
        # A registry accepts a manifest only once everything it references is there, so a
        # manifest present on the sink has its whole tree there too.
        if self.sink.manifest_digest(destination, fetched.digest) is None:
            for child in parsed.children:
                child_manifest = self.source.manifest(repository, child.digest)
                if child_manifest is None:
                    raise SourceChanged(f"{repository}@{child.digest} (a child of {fetched.digest}) is gone")
                self.copy_manifest(repository, destination, child_manifest, depth)
            for blob in parsed.blobs:
                self.copy_blob(repository, destination, blob.digest, blob.size)
            tagged = tag is not None and not self.referrers_to_copy(repository, fetched.digest, depth)
            reference = tag if tagged and tag is not None else fetched.digest
            self.sink.put_manifest(destination, reference, fetched, parsed.subject)
            self.job.count(manifests_sent=1, bytes_sent=len(fetched.data))
            self.outcome.actions.append(f"sent {destination}@{fetched.digest}")
        # Listed (again) once the manifest is there: a referrer pushed meanwhile is not missed
        # (its own job finds the subject on the sink and copies it, or this list has it).
        self.copy_referrers(repository, destination, fetched.digest, depth)
        return tagged

    def referrers_to_copy(self, repository: str, subject: str, depth: int) -> list[str]:
        """Digests of the referrers of ``subject`` the rule copies."""
        if not self.rule.rule.include_referrers or depth >= MAX_REFERRER_DEPTH:
            return []
        return [
            descriptor["digest"]
            for descriptor in self.source.referrers(repository, subject)
            if isinstance(descriptor.get("digest"), str)
            and self.rule.covers_referrer(descriptor.get("artifactType"))
        ]

    def copy_referrers(self, repository: str, destination: str, subject: str, depth: int) -> None:
        for digest in self.referrers_to_copy(repository, subject, depth):
            referrer = self.source.manifest(repository, digest)
            if referrer is not None:  # deleted meanwhile: nothing to copy
                self.copy_manifest(repository, destination, referrer, depth + 1)

    # -- blobs -------------------------------------------------------------------------------
    def copy_blob(self, repository: str, destination: str, digest: str, size: int) -> None:
        if (destination, digest) in self._blobs_done:
            return
        self.job.touch()
        with self.blob_locks.hold((self.sink.name, digest)):
            self._copy_blob(repository, destination, digest, size)
        self._blobs_done.add((destination, digest))

    def _copy_blob(self, repository: str, destination: str, digest: str, size: int) -> None:
        if self.sink.has_blob(destination, digest) or (
            self.job.resume_point(digest) is None and self.sink.mount_blob(destination, digest)
        ):
            self.job.count(blobs_skipped=1, bytes_skipped=size)
        else:
            self.sink.upload_blob(
                destination,
                digest,
                size,
                lambda start, end: self.source.read_blob(repository, digest, start, end),
                self.job,
            )
            self.job.save(None)
            self.job.count(blobs_sent=1)
            self.outcome.actions.append(f"sent blob {digest} ({size} bytes)")
        self.sink.blob_arrived(destination, digest)


def describe(outcome: CopyOutcome) -> dict[str, Any]:
    return {"actions": outcome.actions[:50], "count": len(outcome.actions)}
