"""The polling loop shared by the replication worker and the webhook sender.

Only the process holding the job's lease works; an idle round only reads. The lease is
renewed a few times per TTL, and processes that do not hold it try again every few
seconds (a dead holder on this host is taken over at once, see ``engine.jobs``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cargohold.engine.jobs import JobLedger

log = logging.getLogger(__name__)


def run_leased_loop(
    jobs: JobLedger,
    lease: str,
    poll_interval: float,
    stop: threading.Event,
    step: Callable[[], object],
    name: str,
) -> None:
    ttl = max(30.0, 10 * poll_interval)
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
        stop.wait(poll_interval)
