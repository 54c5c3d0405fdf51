"""Which objects a replication rule covers, and what job an event becomes.

Jobs describe *what to bring in line*, never *what happened*: "make tag T of repository
R on the receiving side match the source" or "make manifest D match". The job reads the
source's state when it runs, so jobs are idempotent, a burst of events for one tag is
one job, and jobs that run out of order still converge on the source's state.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from cargohold.config import ReplicationRule
from cargohold.engine.events import DELETE, PUSH, TAG, UNTAG, Event
from cargohold.engine.metadata_events import NewJob
from cargohold.engine.names import repository_glob, tag_matcher
from cargohold.engine.pullthrough import namespace_of

TAG_JOB = "tag"
MANIFEST_JOB = "manifest"
# The OCI referrers tag schema (``sha256-<hex>``, also cosign's ``sha256-<hex>.sig``): these tags
# index referrers on registries without the referrers API; referrers are copied as referrers.
REFERRER_TAG = re.compile(r"(sha256-[0-9a-f]{64}|sha512-[0-9a-f]{128})(\.[A-Za-z0-9_-]+)?")


def has_wildcard(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


@dataclass
class CompiledRule:
    rule: ReplicationRule
    # Pull-through cache namespaces: their blobs arrive on a client's first pull, so a push
    # rule never sends them (it would find manifests whose layers were never fetched).
    cache_prefixes: tuple[str, ...] = ()
    _repositories: list[re.Pattern[str]] = field(init=False)
    _tags: list[Callable[[str], bool]] = field(init=False)

    def __post_init__(self) -> None:
        self._repositories = [repository_glob(glob) for glob in self.rule.repositories]
        self._tags = [tag_matcher(pattern) for pattern in self.rule.tags]

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def push(self) -> bool:
        return self.rule.direction == "push"

    @property
    def consumer(self) -> str:
        """The rule's cursor in the event log."""
        return f"replication:{self.rule.name}"

    def covers_repository(self, repository: str) -> bool:
        if self.push and namespace_of(repository, self.cache_prefixes) is not None:
            return False
        return any(glob.fullmatch(repository) for glob in self._repositories)

    def covers_tag(self, tag: str) -> bool:
        return REFERRER_TAG.fullmatch(tag) is None and any(match(tag) for match in self._tags)

    def covers_artifact(self, artifact_type: str | None, media_type: str | None) -> bool:
        """Images count as their config type, indexes without artifactType as their media type."""
        wanted = self.rule.artifact_types
        return not wanted or (artifact_type or media_type) in wanted

    def covers_referrer(self, artifact_type: str | None) -> bool:
        wanted = self.rule.referrer_types
        return self.rule.include_referrers and (not wanted or artifact_type in wanted)

    def destination(self, repository: str) -> str:
        return self.rule.target_prefix + repository

    def job_for(self, event: Event) -> NewJob | None:
        """The job a push rule makes of an event, or None if the rule does not care."""
        if not self.push or not self.covers_repository(event.repository):
            return None
        deletes = self.rule.propagate_deletes
        if event.action in (TAG, UNTAG) and event.tag is not None and self.covers_tag(event.tag):
            if event.action == TAG and not self.covers_artifact(event.artifact_type, event.media_type):
                return None
            if event.action == UNTAG and not deletes:
                return None
            return self._job(event, TAG_JOB, event.tag)
        if event.digest is None:
            return None
        # An untagged push matters only as a referrer: an index's children and an image's
        # blobs travel with the tag that names them.
        if event.action == PUSH and event.subject is not None and self.covers_referrer(event.artifact_type):
            return self._job(event, MANIFEST_JOB, event.digest)
        if event.action == DELETE and deletes:
            return self._job(event, MANIFEST_JOB, event.digest)
        return None

    def _job(self, event: Event, kind: str, name: str) -> NewJob:
        return NewJob(self.name, event.repository, kind, name, event.digest, event.id, event.created_at)
