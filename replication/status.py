"""Per-rule replication status, read from the metadata store alone (any process can ask).

lag: how old the oldest change still waiting for the rule is (a pending or running job,
or an event its dispatcher has not read yet); 0 when the rule is caught up.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from cargohold.config import ReplicationRule
from cargohold.engine import Registry
from cargohold.engine.metadata_events import STAT_COUNTERS, ReplicationQueries

STATES = ("pending", "running", "done", "dead")


def replication_status(registry: Registry, rules: Iterable[ReplicationRule] = ()) -> list[dict[str, Any]]:
    """The status of every rule known to the store, plus the configured ones not run yet."""
    queries = ReplicationQueries()
    conn = registry.store.read()
    stats = queries.stats(conn)
    counts = queries.job_counts(conn)
    oldest_job = queries.oldest_open(conn)
    configured = {rule.name: rule for rule in rules}
    now = time.time()
    report = []
    for name in sorted(set(stats) | set(configured)):
        row = stats.get(name, {})
        rule = configured.get(name)
        direction = rule.direction if rule else row.get("direction") or "push"
        target = rule.target if rule else row.get("target")
        waiting = [oldest_job.get(name)]
        if direction == "push":
            waiting.append(registry.events.oldest_unread(f"replication:{name}"))
        oldest = min((when for when in waiting if when is not None), default=None)
        entry: dict[str, Any] = {
            "rule": name,
            "direction": direction,
            "target": target,
            "configured": rule is not None or not configured,
            "lag_seconds": round(max(now - oldest, 0.0), 3) if oldest is not None else 0.0,
            "jobs": {state: counts.get((name, state), 0) for state in STATES},
        }
        entry.update({counter: int(row.get(counter) or 0) for counter in STAT_COUNTERS})
        entry["last_success_at"] = row.get("last_success_at")
        entry["last_error"] = row.get("last_error")
        entry["last_error_at"] = row.get("last_error_at")
        report.append(entry)
    return report
