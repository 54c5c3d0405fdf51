"""``fsck``: do the metadata and the stored bytes agree? Runs online, without stopping pushes.

What "consistent" means (and what each finding's ``kind`` names):

``missing_object``       a live blob row whose stored object is gone; repair quarantines the
                         row (it answers 404, so clients push the blob again)
``size_mismatch``        the stored object's size differs from the row's
``refcount``             a blob's manifest_refs or repo_links differ from the rows they count
``dangling_reference``   a manifest references a blob or child manifest that is not there
                         (not a blob in a pull-through cache namespace: fetched when pulled)
``orphan_reference``     reference rows of a manifest that is gone (they pin its blobs)
``dangling_tag``         a tag names no manifest of its repository
``manifest_bytes``       a manifest row without its stored bytes
``content_count``        a manifest content's repo_count differs from its manifest rows
``expired_upload``       an upload session past its expiry
``stuck_tombstone``      a tombstoned blob whose copy is not queued for deletion
``leak``                 a stored object no row names (a crash between writing and recording)
``quota_count``          a quota namespace's counters differ from its link rows (repair recounts it)

``repair`` fixes only what is safe: recount counters, expire uploads, queue stuck
tombstones and old leaks for the GC, and drop dangling tags only when asked to. It never
deletes a blob that something references, and never touches a blob's bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from cargohold.backends.base import Backend, BackendError, ObjectNotFound
from cargohold.engine.collection import Collection
from cargohold.engine.metadata import MetadataStore
from cargohold.engine.metadata_fsck import FsckQueries
from cargohold.engine.metadata_jobs import JobQueries
from cargohold.engine.uploads import UploadSessions

IN_FLIGHT_SECONDS = 60.0  # an unnamed object younger than this may be a commit about to be recorded


@dataclass(frozen=True)
class Finding:
    kind: str
    subject: str
    detail: str
    repaired: bool = False


@dataclass
class FsckReport:
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    blobs_checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.unrepaired

    @property
    def unrepaired(self) -> list[Finding]:
        return [finding for finding in self.findings if not finding.repaired]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["clean"] = self.clean
        return data


def fsck(
    store: MetadataStore,
    backend: Backend,
    *,
    repair: bool = False,
    drop_dangling_tags: bool = False,
    leak_grace_seconds: float = 3600.0,
    workers: int = 8,
    lazy_blobs: Callable[[str], bool] = lambda _repository: False,
) -> FsckReport:
    """``lazy_blobs`` says which repositories fetch their blobs on first pull (caches)."""
    report = FsckReport()
    queries = FsckQueries()
    _check_objects(store, backend, report, repair, workers)
    _check_rows(store, backend, queries, report, repair, drop_dangling_tags, lazy_blobs)
    _check_quotas(store, report, repair)
    _check_leaks(store, backend, queries, report, repair, leak_grace_seconds)
    report.finished_at = time.time()
    return report


def _check_objects(
    store: MetadataStore, backend: Backend, report: FsckReport, repair: bool, workers: int
) -> None:
    blobs = list(FsckQueries().live_blobs(store.read()))
    report.blobs_checked = len(blobs)

    def stat(item: tuple[str, str, int]) -> Finding | None:
        digest, key, size = item
        try:
            actual = backend.stat(key).size
        except ObjectNotFound:
            return Finding("missing_object", digest, f"stored object {key} is missing")
        except BackendError as exc:
            return Finding("missing_object", digest, f"cannot stat {key}: {exc}")
        if actual != size:
            return Finding("size_mismatch", digest, f"{key} holds {actual} bytes, the row says {size}")
        return None

    with ThreadPoolExecutor(workers) as pool:
        found = [f for f in pool.map(stat, blobs) if f is not None]
    if repair:
        keys = {digest: key for digest, key, _size in blobs}
        with store.write() as conn:
            for finding in found:
                if finding.kind == "missing_object" and JobQueries(store).quarantine(
                    conn, finding.subject, keys[finding.subject]
                ):
                    finding = Finding(finding.kind, finding.subject, finding.detail + "; quarantined", True)
                report.findings.append(finding)
    else:
        report.findings.extend(found)


def _check_rows(
    store: MetadataStore,
    backend: Backend,
    queries: FsckQueries,
    report: FsckReport,
    repair: bool,
    drop_tags: bool,
    lazy_blobs: Callable[[str], bool],
) -> None:
    conn = store.read()
    drift = queries.refcount_drift(conn)
    content = queries.content_count_drift(conn)
    dangling_tags = queries.dangling_tags(conn)
    expired = queries.expired_uploads(conn, time.time())
    stuck = queries.stuck_tombstones(conn)
    orphans = queries.orphan_references(conn)
    for repository, manifest, target, kind in queries.dangling_references(conn):
        if kind == "blob" and lazy_blobs(repository):
            continue
        report.findings.append(
            Finding("dangling_reference", f"{repository}@{manifest}", f"{kind} {target} is missing")
        )
    for repository, digest in queries.manifests_without_bytes(conn):
        report.findings.append(
            Finding("manifest_bytes", f"{repository}@{digest}", "no stored manifest bytes")
        )
    with store.write() as tx:
        if repair:
            freed = queries.drop_orphan_references(tx) if orphans else []
            queries.recount(tx, sorted({row[0] for row in drift} | set(freed)))
            queries.recount_content(tx, [row[0] for row in content])
            queries.queue_for_deletion(tx, [(key, digest) for digest, key in stuck], time.time())
            if drop_tags:
                for repository, tag, _digest in dangling_tags:
                    queries.drop_tag(tx, repository, tag)
    for repository, manifest in orphans:
        report.findings.append(
            Finding("orphan_reference", f"{repository}@{manifest}", "manifest is gone", repair)
        )
    for digest, refs, counted_refs, links, counted_links in drift:
        detail = (
            f"manifest_refs {refs} (counted {counted_refs}), repo_links {links} (counted {counted_links})"
        )
        report.findings.append(Finding("refcount", digest, detail, repaired=repair))
    for digest, count, counted in content:
        report.findings.append(
            Finding("content_count", digest, f"repo_count {count}, counted {counted}", repair)
        )
    for repository, tag, digest in dangling_tags:
        report.findings.append(
            Finding("dangling_tag", f"{repository}:{tag}", f"names missing {digest}", repair and drop_tags)
        )
    for upload_id, repository in expired:
        report.findings.append(
            Finding("expired_upload", f"{repository} {upload_id}", "past its expiry", repair)
        )
    for digest, key in stuck:
        report.findings.append(Finding("stuck_tombstone", digest, f"{key} not queued for deletion", repair))
    if repair and expired:
        # Expiring also removes the staged bytes, which the upload sessions know how to do.
        UploadSessions(store, backend, 0).expire(staged_grace_seconds=float("inf"))


def _check_quotas(store: MetadataStore, report: FsckReport, repair: bool) -> None:
    """Each counted namespace against its link rows, in one snapshot (pushes go on meanwhile)."""
    quotas = store.quota_counts
    conn = store.read()
    conn.execute("BEGIN")
    try:
        drifted = [(row, found) for row in quotas.namespaces(conn) if (found := quotas.drift(conn, row))]
    finally:
        conn.execute("COMMIT")
    for row, (counted, objects) in drifted:
        if repair:
            with store.write() as tx:
                quotas.count(tx, row.pattern, row.limit_bytes, row.warn_bytes, time.time())
        detail = f"{row.bytes} bytes in {row.objects} objects, counted {counted} in {objects}"
        report.findings.append(Finding("quota_count", row.pattern, detail, repair))


def _check_leaks(
    store: MetadataStore,
    backend: Backend,
    queries: FsckQueries,
    report: FsckReport,
    repair: bool,
    grace: float,
) -> None:
    collection = Collection(store, backend)
    now = time.time()
    cutoff = now - grace
    leaks = collection.leaks(now - IN_FLIGHT_SECONDS)
    old = [info for info in leaks if info.modified < cutoff]
    if repair and old:
        with store.write() as tx:
            queries.queue_for_deletion(tx, [(info.key, None) for info in old], time.time())
    for info in leaks:
        queued = repair and info.modified < cutoff
        report.findings.append(Finding("leak", info.key, f"{info.size} bytes, no row names it", queued))
