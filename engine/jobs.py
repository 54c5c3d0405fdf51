"""Leases and run reports for long jobs (GC, retention, replication, scrub).

A lease row in the metadata store decides which process (on which node) runs a job:
schedulers in every worker fire, and only the one that takes the lease works. A
lease expires on its own, so a runner that was killed does not block the job forever.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cargohold.engine.metadata import MetadataStore
from cargohold.engine.metadata_jobs import JobQueries, JobRun


def dead_local_process(owner: str) -> bool:
    """True when ``owner`` (host:pid:nonce) names a process of this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class JobAlreadyRunning(Exception):
    """Another process holds the job's lease."""


class JobLedger:
    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self.queries = JobQueries(store)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def acquire(self, name: str, ttl: float) -> bool:
        """Take (or renew) the lease; False while another live runner holds it.

        A lease whose holder was a process on this host that no longer exists (killed,
        crashed) is taken over at once rather than after its expiry.
        """
        with self.store.write() as conn:
            now = time.time()
            if self.queries.acquire_lease(conn, name, self.owner, ttl, now):
                return True
            holder = self.queries.lease_owner(conn, name)
            if holder is not None and dead_local_process(holder):
                return self.queries.take_over_lease(conn, name, holder, self.owner, ttl, now)
            return False

    def holder(self, name: str) -> str | None:
        """Who holds the lease ``name`` now (host:pid:nonce), if anyone."""
        return self.queries.lease_owner(self.store.read(), name)

    def release(self, name: str) -> None:
        with self.store.write() as conn:
            self.queries.release_lease(conn, name, self.owner)

    @contextmanager
    def exclusive(self, name: str, ttl: float = 600.0) -> Iterator[None]:
        """Hold the lease for the block, or raise ``JobAlreadyRunning``."""
        if not self.acquire(name, ttl):
            raise JobAlreadyRunning(name)
        try:
            yield
        finally:
            self.release(name)

    def start_run(self, kind: str, dry_run: bool) -> int:
        with self.store.write() as conn:
            return self.queries.start_run(conn, kind, dry_run)

    def finish_run(self, run_id: int, status: str, summary: dict[str, Any]) -> None:
        with self.store.write() as conn:
            self.queries.finish_run(conn, run_id, status, summary)

    def last_leak_scan(self) -> float | None:
        return self.queries.last_leak_scan(self.store.read())

    def run_counts(self) -> dict[tuple[str, str], int]:
        """Finished and running (not dry) runs by (kind, status)."""
        return self.queries.run_counts(self.store.read())

    def runs(self, kind: str | None = None, limit: int = 20) -> list[JobRun]:
        return self.queries.runs(self.store.read(), kind, limit)
