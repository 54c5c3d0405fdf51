"""The polling loop shared by the replication worker and the webhook sender.

Only the process holding the job's lease works; an idle round only reads. The lease is
renewed a few times per TTL, and processes that do not hold it try again every few
seconds (a dead holder on this host is taken over at once, see ``engine.jobs``). A
caller whose work ends between rounds (a finished job frees a worker) passes ``wake``
and sets it, so the next round does not wait out the poll interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cargohold.engine.jobs import JobLedger

log = logging.getLogger(__name__)


def lease_ttl(poll_interval: float) -> float:
    """How long a loop's lease lasts unrenewed; it is renewed a few times in that span."""
    return max(30.0, 10 * poll_interval)


def run_leased_loop(
    jobs: JobLedger,
    lease: str,
    poll_interval: float,
    stop: threading.Event,
    step: Callable[[], object],
    name: str,
    wake: threading.Event | None = None,
) -> None:
    ttl = lease_ttl(poll_interval)
    holding, next_try = False, 0.0
    while not stop.is_set():
        try:
            if time.monotonic() >= next_try:
                holding = jobs.acquire(lease, ttl)
                next_try = time.monotonic() + (ttl / 3 if holding else max(poll_interval, 2.0))
            if holding:
                step()
        except Exception:
            log.exception("%s round failed", name)
        if wake is None:
            stop.wait(poll_interval)
        else:
            wake.wait(poll_interval)  # set by stop() too
            wake.clear()
