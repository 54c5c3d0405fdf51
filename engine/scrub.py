"""Scrub: re-read stored bytes and check them, slowly enough not to starve clients.

Two depths: the *fast* pass compares each blob with the xxh3 checksum recorded when it
was written (an order of magnitude cheaper than SHA-256, enough to notice bit rot); the
*full* pass recomputes the digest itself. A blob without a recorded checksum (its upload
crossed processes) gets a full check and then its checksum.

A blob whose bytes do not match is *quarantined*: its row leaves the 'live' state in a
transaction that re-checks it still names the same copy, so it is never served again
(clients get BLOB_UNKNOWN and push it again, which stores a fresh copy and revives the
row). The corrupt copy stays where it is for inspection until the re-push queues it for
deletion.

A pass walks the blobs in digest order from a cursor kept in the metadata store, so it
can be stopped at any time and resumes where it was; the cursor returns to the start
when a pass completes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from cargohold.backends.base import Backend, BackendError, ObjectNotFound
from cargohold.engine.hashing import ContentHasher
from cargohold.engine.metadata import MetadataStore
from cargohold.engine.metadata_jobs import JobQueries

PAGE = 200


@dataclass
class ScrubReport:
    full: bool
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    blobs_checked: int = 0
    bytes_read: int = 0
    checksums_recorded: int = 0
    quarantined: list[dict[str, str]] = field(default_factory=list)
    unreadable: list[dict[str, str]] = field(default_factory=list)
    pass_completed: bool = False

    def summary(self) -> dict[str, Any]:
        return asdict(self)


class _Throttle:
    """Sleeps so that reading stays under ``rate`` bytes a second (0: unlimited)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.started = time.monotonic()
        self.done = 0

    def consumed(self, count: int) -> None:
        if self.rate <= 0:
            return
        self.done += count
        ahead = self.done / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)


def scrub(
    store: MetadataStore,
    backend: Backend,
    *,
    full: bool = False,
    rate_bytes_per_second: float = 0.0,
    max_seconds: float | None = None,
) -> ScrubReport:
    """Check blobs from the saved cursor on; stop at the end of the pass or after ``max_seconds``."""
    queries = JobQueries(store)
    cursor_name = f"scrub.cursor.{'full' if full else 'fast'}"
    cursor = queries.admin_setting(store.read(), cursor_name) or ""
    report = ScrubReport(full=full)
    throttle = _Throttle(rate_bytes_per_second)
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    while deadline is None or time.monotonic() < deadline:
        page = queries.blobs_after(store.read(), cursor, PAGE)
        if not page:
            report.pass_completed = True
            cursor = ""
            break
        for digest, key, size, checksum in page:
            _check_one(store, backend, queries, report, throttle, digest, key, size, checksum, full)
            cursor = digest
            if deadline is not None and time.monotonic() >= deadline:
                break
        with store.write() as conn:
            queries.set_admin_setting(conn, cursor_name, cursor)
    with store.write() as conn:
        queries.set_admin_setting(conn, cursor_name, cursor or None)
    report.finished_at = time.time()
    return report


def _check_one(
    store: MetadataStore,
    backend: Backend,
    queries: JobQueries,
    report: ScrubReport,
    throttle: _Throttle,
    digest: str,
    key: str,
    size: int,
    checksum: str | None,
    full: bool,
) -> None:
    algorithm = digest.partition(":")[0]
    hasher = ContentHasher(algorithm) if full or checksum is None else None
    fast = xxhash.xxh3_128()
    read = 0
    try:
        for chunk in backend.read(key):
            fast.update(chunk)
            if hasher is not None:
                hasher.update(chunk)
            read += len(chunk)
            throttle.consumed(len(chunk))
    except ObjectNotFound:
        _quarantine(store, queries, report, digest, key, "stored object is missing")
        return
    except BackendError as exc:
        report.unreadable.append({"digest": digest, "error": str(exc)})
        return
    report.blobs_checked += 1
    report.bytes_read += read
    seen_checksum = f"xxh3-128:{fast.hexdigest()}"
    if read != size:
        _quarantine(store, queries, report, digest, key, f"{read} bytes stored, {size} recorded")
    elif hasher is not None and hasher.finish()[0] != digest:
        _quarantine(store, queries, report, digest, key, "bytes do not match the digest")
    elif checksum is not None and checksum != seen_checksum:
        _quarantine(store, queries, report, digest, key, "bytes do not match the recorded checksum")
    elif checksum is None:
        with store.write() as conn:
            queries.record_checksum(conn, digest, key, seen_checksum)
        report.checksums_recorded += 1


def _quarantine(
    store: MetadataStore, queries: JobQueries, report: ScrubReport, digest: str, key: str, reason: str
) -> None:
    with store.write() as conn:
        if queries.quarantine(conn, digest, key):
            report.quarantined.append({"digest": digest, "key": key, "reason": reason})
