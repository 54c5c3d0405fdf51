"""The engine's half of retention: what each repository holds, what deleting manifests
would free, deletions that re-check what a plan saw, and the policies an admin stored.

Retention (``cargohold.gc.retention``) decides *what* goes from this read model; the
engine keeps the invariants:

``repository(name)``
    One repository's manifests with their tags, times, media and artifact type, subject
    and index children, read in one snapshot, as plain dataclasses.
``freed_bytes(doomed)``
    The unique bytes a GC would reclaim once the doomed manifests are gone: blobs whose
    every manifest reference (``blobs.manifest_refs``, across all repositories) belongs to
    a doomed manifest. A query over the refcounts, never a scan of the store.
``delete_manifest(...)`` / ``delete_tag(...)``
    Compare-and-delete, each in one write transaction: a manifest goes only if it gained
    no tag, no index lists it and the subject it followed is gone; a tag goes only while
    it still names the planned manifest. Otherwise nothing changes ("changed since plan").
    Immutable tags hold here too, whatever a plan said ("immutable": a rule added since).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from cargohold.engine.maintenance import ReadOnlySwitch
from cargohold.engine.metadata import Conn, MetadataStore
from cargohold.engine.metadata_jobs import JobQueries
from cargohold.engine.metadata_retention import RetentionQueries

if TYPE_CHECKING:  # immutability stores its rules with StoredPolicies: no import cycle at run time
    from cargohold.engine.immutability import ImmutableTags

Outcome = Literal["deleted", "changed since plan", "already gone", "immutable"]
POLICIES_SETTING = "retention.policies"  # the admin_settings row of the stored policies


@dataclass(frozen=True, slots=True)
class TagInfo:
    name: str
    pushed_at: float  # when the tag last moved to its manifest
    last_pulled_at: float | None


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    digest: str
    media_type: str
    artifact_type: str | None
    subject: str | None
    pushed_at: float
    last_pulled_at: float | None
    tags: tuple[TagInfo, ...]
    children: tuple[str, ...]  # the manifests an index lists

    @property
    def tag_names(self) -> tuple[str, ...]:
        return tuple(tag.name for tag in self.tags)


@dataclass(frozen=True)
class RepositoryInventory:
    name: str
    manifests: dict[str, ManifestInfo]


class Inventory:
    def __init__(
        self, store: MetadataStore, read_only: ReadOnlySwitch, immutable: ImmutableTags | None = None
    ) -> None:
        self.store = store
        self.read_only = read_only  # read-only mode refuses these deletions like any other write
        self.immutable = immutable
        self.queries = RetentionQueries(store)

    def repositories(self) -> list[str]:
        """Names of the repositories that hold manifests."""
        with self.queries.snapshot() as conn:
            return [name for _id, name in self.queries.repositories(conn)]

    def repository(self, name: str) -> RepositoryInventory:
        """Everything retention judges in one repository (empty if it does not exist)."""
        with self.queries.snapshot() as conn:
            repo_id = self.store.repository_id(conn, name)
            if repo_id is None:
                return RepositoryInventory(name, {})
            tags: dict[str, list[TagInfo]] = defaultdict(list)
            for digest, tag, pushed_at, pulled_at in self.queries.tags(conn, repo_id):
                tags[digest].append(TagInfo(tag, pushed_at, pulled_at))
            children: dict[str, list[str]] = defaultdict(list)
            for index, child in self.queries.index_edges(conn, repo_id):
                children[index].append(child)
            manifests = {
                row[0]: ManifestInfo(*row, tuple(tags[row[0]]), tuple(sorted(children[row[0]])))
                for row in self.queries.manifests(conn, repo_id)
            }
        return RepositoryInventory(name, manifests)

    def freed_bytes(self, doomed: Sequence[tuple[str, str]]) -> list[int]:
        """For each doomed (repository, manifest), the bytes only doomed manifests reference.

        A blob shared by several doomed manifests is counted once, on the first of them,
        so the list sums to what the GC would free.
        """
        by_repository: dict[str, list[str]] = defaultdict(list)
        for repository, digest in doomed:
            by_repository[repository].append(digest)
        refs: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
        doomed_refs: dict[str, int] = defaultdict(int)
        refcount: dict[str, int] = {}
        with self.queries.snapshot() as conn:
            for repository, digests in by_repository.items():
                repo_id = self.store.repository_id(conn, repository)
                if repo_id is None:
                    continue
                for manifest, blob, size, manifest_refs in self.queries.blob_references(
                    conn, repo_id, digests
                ):
                    refs[(repository, manifest)].append((blob, size))
                    doomed_refs[blob] += 1
                    refcount[blob] = manifest_refs
        counted: set[str] = set()
        freed = []
        for key in doomed:
            total = 0
            for blob, size in refs[key]:
                if blob not in counted and doomed_refs[blob] >= refcount[blob]:
                    counted.add(blob)
                    total += size
            freed.append(total)
        return freed

    def delete_manifest(
        self, repository: str, digest: str, tags: Collection[str], subject: str | None
    ) -> Outcome:
        """Delete the manifest unless it changed since the plan saw it with ``tags``.

        Changed means: it carries a tag the plan did not list, an index lists it, or
        ``subject`` (the manifest it followed as a referrer) is still there.
        """
        self.read_only.check()
        with self.store.write() as conn:
            repo_id = self.store.repository_id(conn, repository)
            if repo_id is None or not self.store.has_manifest(conn, repo_id, digest):
                return "already gone"
            if (
                not self.queries.manifest_tags(conn, repo_id, digest) <= set(tags)
                or self.queries.is_listed(conn, repo_id, digest)
                or (subject is not None and self.store.has_manifest(conn, repo_id, subject))
            ):
                return "changed since plan"
            if self._protected(conn, repo_id, repository, digest, by_digest=True):
                return "immutable"
            self.store.delete_manifest(conn, repo_id, digest)
        return "deleted"

    def delete_tag(self, repository: str, tag: str, digest: str) -> Outcome:
        """Delete the tag if it still names ``digest``."""
        self.read_only.check()
        with self.store.write() as conn:
            repo_id = self.store.repository_id(conn, repository)
            if repo_id is None:
                return "already gone"
            if self._protected(conn, repo_id, repository, tag, by_digest=False):
                return "immutable"
            if self.queries.delete_tag_of(conn, repo_id, tag, digest):
                return "deleted"
            return "changed since plan" if self.store.resolve_tag(conn, repository, tag) else "already gone"

    def _protected(
        self, conn: Conn, repo_id: int, repository: str, reference: str, *, by_digest: bool
    ) -> bool:
        return self.immutable is not None and bool(
            self.immutable.protected_by(conn, repo_id, repository, reference, by_digest)
        )


class StoredPolicies:
    """Policies set through the admin API (retention's; ``name`` picks another kind, such as
    immutable tag rules), as the JSON text the admin sent (validated by the caller). They
    override the config file's until forgotten."""

    def __init__(self, store: MetadataStore, name: str = POLICIES_SETTING) -> None:
        self.store = store
        self.name = name
        self.queries = JobQueries(store)

    def get(self, conn: Conn | None = None) -> str | None:
        """``conn``: read inside the caller's transaction (a check that must not race a change)."""
        return self.queries.admin_setting(conn or self.store.read(), self.name)

    def put(self, document: str) -> None:
        with self.store.write() as conn:
            self.queries.set_admin_setting(conn, self.name, document)

    def forget(self) -> bool:
        """Go back to the config file's policies; False if none were stored."""
        with self.store.write() as conn:
            stored = self.queries.admin_setting(conn, self.name) is not None
            self.queries.set_admin_setting(conn, self.name, None)
        return stored
