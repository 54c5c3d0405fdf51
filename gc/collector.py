"""Online mark-and-sweep garbage collection, driven by the metadata.

No read-only window: pushes, pulls and deletes go on during a run. What may be
deleted is decided by the engine's ``Collection`` steps (each one transaction that
re-checks); this module orders them, honours dry runs and writes the run's report.

Order of a run:
1. purge copies queued by an earlier, interrupted run (resume);
2. expire stale upload sessions (and staged bytes no session owns);
3. delete referrers whose subject is gone (optional), which may free more blobs;
4. mark and sweep blobs, then purge their copies;
5. find leaked objects (no row names them) by listing the backend, and delete them (at
   most once per ``leak_scan_every``: leaks come only from crashes, and on an object store
   the listing is most of a run's requests).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cargohold.engine import Registry
from cargohold.engine.collection import PurgeResult
from cargohold.engine.errors import ManifestUnknown
from cargohold.engine.metadata_jobs import Settled
from cargohold.gc.priority import run_at_lower_priority

log = logging.getLogger(__name__)
LEASE = "gc"
LEASE_TTL = 120.0  # renewed after every page of the sweep
IN_FLIGHT = 3  # sweep pages whose deletes may still run while the next page is swept


@dataclass
class GCReport:
    dry_run: bool
    grace_seconds: float
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    blobs_deleted: int = 0
    bytes_freed: int = 0
    leaks_deleted: int = 0
    leak_bytes_freed: int = 0
    leak_scan: bool = False
    uploads_expired: int = 0
    referrers_deleted: int = 0
    resumed_deletions: int = 0
    would_delete: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.bytes_freed + self.leak_bytes_freed

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data["would_delete_count"] = len(self.would_delete)
        data["would_delete"] = self.would_delete[:1000]  # the report row stays small
        data["total_bytes"] = self.total_bytes
        return data


Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class Pacing:
    """How a run makes room for requests between sweep pages: it sleeps ``always`` times as
    long as the page took, plus ``when_busy`` times as long if other connections committed
    meanwhile (pushes are on), so then it holds the write lock and the disk a fraction of
    the time, and runs flat out on an idle registry."""

    always: float = 0.0
    when_busy: float = 0.0

    def pause(self, worked: float, others_wrote: bool) -> float:
        return worked * (self.always + (self.when_busy if others_wrote else 0.0))


def collect(
    registry: Registry,
    *,
    grace_seconds: float,
    dry_run: bool = False,
    delete_orphan_referrers: bool = True,
    progress: Progress | None = None,
    pacing: Pacing = Pacing(),
    nice: int = 0,
    leak_scan_every: float = 0.0,
) -> GCReport:
    """One GC run under the GC lease; raises ``JobAlreadyRunning`` if another one is going.
    With ``nice`` it runs that many steps lower in CPU priority (``gc.priority``); it lists
    the store for leaks if no run did in the last ``leak_scan_every`` seconds (0: always)."""
    return run_at_lower_priority(
        lambda: _collect(
            registry, grace_seconds, dry_run, delete_orphan_referrers, progress, pacing, leak_scan_every
        ),
        nice,
    )


def _collect(
    registry: Registry,
    grace_seconds: float,
    dry_run: bool,
    delete_orphan_referrers: bool,
    progress: Progress | None,
    pacing: Pacing,
    leak_scan_every: float,
) -> GCReport:
    report = GCReport(dry_run=dry_run, grace_seconds=grace_seconds)
    if not dry_run:
        registry.read_only.check()  # maintenance means no deletes either
    with registry.jobs.exclusive(LEASE, ttl=LEASE_TTL):
        last_scan = registry.jobs.last_leak_scan()
        report.leak_scan = last_scan is None or report.started_at - last_scan >= leak_scan_every
        run_id = registry.jobs.start_run("gc", dry_run)
        status = "failed"
        try:
            _run(registry, report, delete_orphan_referrers, progress or (lambda _step, _n: None), pacing)
            status = "succeeded" if not report.errors else "partial"
        finally:
            report.finished_at = time.time()
            registry.jobs.finish_run(run_id, status, report.summary())
    return report


def _run(registry: Registry, report: GCReport, orphans: bool, progress: Progress, pacing: Pacing) -> None:
    collection = registry.collection
    cutoff = time.time() - report.grace_seconds
    collection.warm_up()
    if report.dry_run:
        _plan(registry, report, cutoff)
        return

    resumed = collection.purge()
    report.resumed_deletions = resumed.deleted
    report.errors.extend(f"could not delete {key}" for key in resumed.failed)
    # Staged uploads no session owns are judged by the session expiry, not the GC grace: a
    # session row is written just after its staged upload is created.
    report.uploads_expired = registry.expire_uploads()

    if orphans:
        for repository, digest in collection.orphan_referrers(cutoff):
            try:
                registry.delete_manifest(repository, digest, force=True)
                report.referrers_deleted += 1
            except ManifestUnknown:
                pass  # deleted by someone else meanwhile

    # On an idle registry the copies of up to IN_FLIGHT pages are deleted in the background
    # while the next pages are swept (the database work and the unlinks overlap), and the
    # transaction after their deletes finished forgets them. When requests wrote meanwhile,
    # a page's deletes finish before the pause, so the pause leaves the disk and the CPUs to
    # them. The leak scan's listing overlaps the last pages' deletes (a copy still queued is
    # named by its queue entry, so it is never a leak).
    deleting: deque[Callable[[], PurgeResult]] = deque()
    settled: list[Settled] = []

    def finish_all_but(keep: int) -> None:
        """Wait for the oldest deletes until ``keep`` are left; report them, to be forgotten."""
        while len(deleting) > keep:
            deleted = deleting.popleft()()
            report.blobs_deleted += deleted.deleted
            report.bytes_freed += deleted.bytes
            report.errors.extend(f"could not delete {key}" for key in deleted.failed)
            settled.extend(deleted.settled)

    after = ""
    while True:
        started = time.monotonic()
        version = registry.store.data_version()
        registry.jobs.acquire(LEASE, LEASE_TTL)  # renew: a long sweep keeps its lease
        swept = collection.sweep(cutoff, after, settled)
        settled.clear()  # forgotten in that transaction
        if not swept.blobs:
            break
        finish_all_but(IN_FLIGHT - 1)
        after = swept.blobs[-1].digest
        progress("sweep", len(swept.blobs))
        others_wrote = registry.store.data_version() != version
        deleting.append(collection.start_deleting(swept, gently=others_wrote))
        if others_wrote:
            finish_all_but(0)
        time.sleep(pacing.pause(time.monotonic() - started, others_wrote))
    leaks = collection.leaks(cutoff) if report.leak_scan else []
    finish_all_but(0)
    collection.forget(settled)

    if leaks:
        deleted = collection.delete_leaks(leaks, cutoff)
        report.leaks_deleted = deleted.deleted
        report.leak_bytes_freed = deleted.bytes
        report.errors.extend(f"could not delete leaked {key}" for key in deleted.failed)
        progress("leaks", deleted.deleted)


def _plan(registry: Registry, report: GCReport, cutoff: float) -> None:
    """A dry run: exactly what a run now would delete, changing nothing."""
    collection = registry.collection
    for blob in collection.queued():
        report.would_delete.append({"kind": "queued", "key": blob.storage_key, "size": blob.size})
        report.bytes_freed += blob.size
    for repository, digest in collection.orphan_referrers(cutoff):
        report.would_delete.append({"kind": "referrer", "repository": repository, "digest": digest})
        report.referrers_deleted += 1
    for page in collection.mark(cutoff):
        for blob in page:
            report.would_delete.append({"kind": "blob", "digest": blob.digest, "size": blob.size})
            report.blobs_deleted += 1
            report.bytes_freed += blob.size
    for leak in collection.leaks(cutoff) if report.leak_scan else []:
        report.would_delete.append({"kind": "leak", "key": leak.key, "size": leak.size})
        report.leaks_deleted += 1
        report.leak_bytes_freed += leak.size
