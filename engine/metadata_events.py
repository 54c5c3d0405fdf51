"""SQL for the outbox (events), its consumers' cursors, replication's durable jobs and the
webhook delivery log.

Part of the metadata layer (all SQL lives in ``metadata*.py`` and the migrations). The
event inserts run inside the registry's own write transactions (``Registry.put_manifest``
and ``delete_manifest``), so an event exists if and only if its change was committed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cargohold.engine.metadata import Conn

EVENT_COLUMNS = "id, created_at, action, repository, digest, tag, media_type, artifact_type, subject, detail"
JOB_COLUMNS = (
    "id, rule, repository, kind, name, digest, event_id, created_at, state, attempts, next_attempt_at, "
    "owner, progress, last_error, bytes_sent, bytes_skipped"
)
STAT_COUNTERS = (
    "bytes_sent",
    "bytes_skipped",
    "blobs_sent",
    "blobs_skipped",
    "manifests_sent",
    "tags_moved",
    "failures",
)


@dataclass(frozen=True, slots=True)
class Event:
    """One row of the outbox, as consumers (replication, webhooks) read it."""

    id: int
    created_at: float
    action: str
    repository: str
    digest: str | None
    tag: str | None
    media_type: str | None
    artifact_type: str | None
    subject: str | None
    detail: dict[str, Any] | None = None  # for actions whose facts fit no column (quota.warning)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class NewEvent:
    action: str
    repository: str
    digest: str | None
    tag: str | None = None
    media_type: str | None = None
    artifact_type: str | None = None
    subject: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class ManifestFacts:
    media_type: str
    artifact_type: str | None
    subject: str | None


@dataclass(frozen=True, slots=True)
class JobRow:
    id: int
    rule: str
    repository: str
    kind: str
    name: str
    digest: str | None
    event_id: int | None
    created_at: float
    state: str
    attempts: int
    next_attempt_at: float
    owner: str | None
    progress: dict[str, Any] | None
    last_error: str | None
    bytes_sent: int
    bytes_skipped: int


@dataclass(frozen=True, slots=True)
class NewJob:
    rule: str
    repository: str
    kind: str  # "tag" or "manifest"
    name: str  # the tag, or the manifest digest
    digest: str | None
    event_id: int | None
    created_at: float


def _job(row: Sequence[Any]) -> JobRow:
    values = list(row)
    values[12] = json.loads(values[12]) if values[12] else None
    return JobRow(*values)


class EventQueries:
    """Statements on ``events`` and ``event_cursors``; callers pass the connection."""

    # -- writing (inside the change's transaction) ---------------------------------------
    def insert(self, conn: Conn, events: Iterable[NewEvent], now: float) -> None:
        conn.executemany(
            "INSERT INTO events (created_at, action, repository, digest, tag, media_type, artifact_type, "
            "subject, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (
                    now,
                    e.action,
                    e.repository,
                    e.digest,
                    e.tag,
                    e.media_type,
                    e.artifact_type,
                    e.subject,
                    e.detail,
                )
                for e in events
            ),
        )

    def manifest_facts(self, conn: Conn, repository_id: int, digest: str) -> ManifestFacts | None:
        row = conn.execute(
            "SELECT media_type, artifact_type, subject FROM manifests WHERE repository_id = ? AND digest = ?",
            (repository_id, digest),
        ).fetchone()
        return ManifestFacts(*row) if row else None

    def tag_digest(self, conn: Conn, repository_id: int, tag: str) -> str | None:
        row = conn.execute(
            "SELECT manifest_digest FROM tags WHERE repository_id = ? AND name = ?", (repository_id, tag)
        ).fetchone()
        return row[0] if row else None

    # -- reading -------------------------------------------------------------------------
    def after(self, conn: Conn, last_id: int, limit: int) -> list[Event]:
        rows = conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE id > ? ORDER BY id LIMIT ?", (last_id, limit)
        )
        return [Event(*row[:-1], json.loads(row[-1]) if row[-1] else None) for row in rows]

    def latest_id(self, conn: Conn) -> int:
        # sqlite_sequence keeps the high-water mark even when every row was pruned.
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return int(row[0]) if row else 0

    def oldest_after(self, conn: Conn, last_id: int) -> float | None:
        row = conn.execute("SELECT MIN(created_at) FROM events WHERE id > ?", (last_id,)).fetchone()
        return row[0]

    # -- cursors -------------------------------------------------------------------------
    def cursor(self, conn: Conn, consumer: str) -> int | None:
        row = conn.execute("SELECT last_id FROM event_cursors WHERE consumer = ?", (consumer,)).fetchone()
        return int(row[0]) if row else None

    def set_cursor(self, conn: Conn, consumer: str, last_id: int, now: float) -> None:
        """Move the cursor forward only: a slow consumer never rewinds a faster copy of itself."""
        conn.execute(
            "INSERT INTO event_cursors (consumer, last_id, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (consumer) DO UPDATE SET last_id = MAX(last_id, excluded.last_id), "
            "updated_at = excluded.updated_at",
            (consumer, last_id, now),
        )

    def cursors(self, conn: Conn) -> dict[str, int]:
        return {row[0]: row[1] for row in conn.execute("SELECT consumer, last_id FROM event_cursors")}

    def forget_cursor(self, conn: Conn, consumer: str) -> None:
        conn.execute("DELETE FROM event_cursors WHERE consumer = ?", (consumer,))

    def prune(self, conn: Conn, up_to_id: int, before: float) -> int:
        cur = conn.execute("DELETE FROM events WHERE id <= ? AND created_at < ?", (up_to_id, before))
        return cur.rowcount


class ReplicationQueries:
    """Statements on ``replication_jobs``, ``replication_stats`` and ``replication_blobs``."""

    # -- jobs ----------------------------------------------------------------------------
    def enqueue(self, conn: Conn, jobs: Iterable[NewJob], now: float) -> int:
        """Add jobs; one already pending for the same object absorbs the new one."""
        cur = conn.executemany(
            "INSERT OR IGNORE INTO replication_jobs (rule, repository, kind, name, digest, event_id, "
            "created_at, next_attempt_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (j.rule, j.repository, j.kind, j.name, j.digest, j.event_id, j.created_at, now, now)
                for j in jobs
            ),
        )
        return cur.rowcount

    def claim(
        self, conn: Conn, owner: str, now: float, lease: float, limit: int, rules: Sequence[str]
    ) -> list[JobRow]:
        """Take up to ``limit`` due jobs of ``rules``. A job whose object is being worked on by
        another running job waits, so two runs never race on one tag."""
        if limit <= 0 or not rules:
            return []
        marks = ",".join("?" * len(rules))
        rows = conn.execute(
            "UPDATE replication_jobs SET state = 'running', owner = ?, lease_expires_at = ?, "
            "attempts = attempts + 1, updated_at = ? WHERE id IN ("
            "SELECT j.id FROM replication_jobs j WHERE j.state = 'pending' AND j.next_attempt_at <= ? "
            f"AND j.rule IN ({marks}) AND NOT EXISTS (SELECT 1 FROM replication_jobs r "
            "WHERE r.state = 'running' AND r.rule = j.rule AND r.repository = j.repository "
            "AND r.kind = j.kind AND r.name = j.name) ORDER BY j.next_attempt_at, j.id LIMIT ?) "
            f"RETURNING {JOB_COLUMNS}",
            (owner, now + lease, now, now, *rules, limit),
        ).fetchall()
        return sorted((_job(row) for row in rows), key=lambda job: job.id)

    def running_owners(self, conn: Conn) -> list[str]:
        rows = conn.execute("SELECT DISTINCT owner FROM replication_jobs WHERE state = 'running'")
        return [row[0] for row in rows if row[0]]

    def requeue_stale(self, conn: Conn, now: float, dead_owners: Sequence[str]) -> int:
        """Running jobs whose runner is gone (lease expired, or a dead local process) go back to
        pending with their progress, so the next run resumes them. If a newer pending job for the
        same object exists, it is replaced: both mean "bring this object in line"."""
        marks = ",".join("?" * len(dead_owners)) or "NULL"
        cur = conn.execute(
            "UPDATE OR REPLACE replication_jobs SET state = 'pending', owner = NULL, next_attempt_at = ?, "
            f"updated_at = ? WHERE state = 'running' AND (lease_expires_at < ? OR owner IN ({marks}))",
            (now, now, now, *dead_owners),
        )
        return cur.rowcount

    def release_owner(self, conn: Conn, owner: str, now: float) -> int:
        """A runner that stops cleanly hands its running jobs back (without spending an attempt)."""
        cur = conn.execute(
            "UPDATE OR REPLACE replication_jobs SET state = 'pending', owner = NULL, "
            "attempts = MAX(attempts - 1, 0), next_attempt_at = ?, updated_at = ? "
            "WHERE state = 'running' AND owner = ?",
            (now, now, owner),
        )
        return cur.rowcount

    def release(self, conn: Conn, job_id: int, owner: str, now: float) -> bool:
        """Hand one running job back (its runner is stopping); its progress is kept."""
        cur = conn.execute(
            "UPDATE OR REPLACE replication_jobs SET state = 'pending', owner = NULL, "
            "attempts = MAX(attempts - 1, 0), next_attempt_at = ?, updated_at = ? "
            "WHERE id = ? AND owner = ? AND state = 'running'",
            (now, now, job_id, owner),
        )
        return cur.rowcount == 1

    def open_jobs(self, conn: Conn, rules: Sequence[str]) -> int:
        """Pending or running jobs of ``rules``."""
        marks = ",".join("?" * len(rules)) or "NULL"
        row = conn.execute(
            "SELECT COUNT(*) FROM replication_jobs WHERE state IN ('pending', 'running') "
            f"AND rule IN ({marks})",
            tuple(rules),
        ).fetchone()
        return int(row[0])

    def checkpoint(
        self,
        conn: Conn,
        job_id: int,
        owner: str,
        progress: dict[str, Any] | None,
        sent: int,
        skipped: int,
        now: float,
        lease: float,
    ) -> bool:
        """Record how far a running job got and extend its lease; False if it is no longer ours."""
        cur = conn.execute(
            "UPDATE replication_jobs SET progress = ?, bytes_sent = bytes_sent + ?, "
            "bytes_skipped = bytes_skipped + ?, lease_expires_at = ?, updated_at = ? "
            "WHERE id = ? AND owner = ? AND state = 'running'",
            (
                json.dumps(progress, separators=(",", ":")) if progress is not None else None,
                sent,
                skipped,
                now + lease,
                now,
                job_id,
                owner,
            ),
        )
        return cur.rowcount == 1

    def finish(self, conn: Conn, job_id: int, owner: str, now: float) -> bool:
        cur = conn.execute(
            "UPDATE replication_jobs SET state = 'done', owner = NULL, progress = NULL, last_error = NULL, "
            "finished_at = ?, updated_at = ? WHERE id = ? AND owner = ? AND state = 'running'",
            (now, now, job_id, owner),
        )
        return cur.rowcount == 1

    def fail(
        self, conn: Conn, job_id: int, owner: str, error: str, retry_at: float | None, now: float
    ) -> bool:
        """Back to pending for a later attempt, or to the dead letters when ``retry_at`` is None."""
        state = "pending" if retry_at is not None else "dead"
        cur = conn.execute(
            "UPDATE OR REPLACE replication_jobs SET state = ?, owner = NULL, last_error = ?, "
            "next_attempt_at = COALESCE(?, next_attempt_at), updated_at = ?, "
            "finished_at = CASE WHEN ? = 'dead' THEN ? ELSE NULL END "
            "WHERE id = ? AND owner = ? AND state = 'running'",
            (state, error[:2000], retry_at, now, state, now, job_id, owner),
        )
        return cur.rowcount == 1

    def not_dead(self, conn: Conn, jobs: Iterable[NewJob]) -> list[NewJob]:
        """The jobs that are not already in the dead letters for the same object and digest
        (a difference that was refused stays refused until an operator retries it)."""
        return [
            job
            for job in jobs
            if conn.execute(
                "SELECT 1 FROM replication_jobs WHERE state = 'dead' AND rule = ? AND repository = ? "
                "AND kind = ? AND name = ? AND digest IS ? LIMIT 1",
                (job.rule, job.repository, job.kind, job.name, job.digest),
            ).fetchone()
            is None
        ]

    def retry_dead(self, conn: Conn, rule: str, now: float) -> int:
        cur = conn.execute(
            "UPDATE OR IGNORE replication_jobs SET state = 'pending', attempts = 0, next_attempt_at = ?, "
            "updated_at = ?, finished_at = NULL WHERE rule = ? AND state = 'dead'",
            (now, now, rule),
        )
        return cur.rowcount

    def jobs(self, conn: Conn, rule: str | None, states: Sequence[str], limit: int) -> list[JobRow]:
        sql = f"SELECT {JOB_COLUMNS} FROM replication_jobs WHERE state IN ({','.join('?' * len(states))})"
        params: list[object] = list(states)
        if rule is not None:
            sql += " AND rule = ?"
            params.append(rule)
        sql += " ORDER BY id LIMIT ?"
        params.append(limit)
        return [_job(row) for row in conn.execute(sql, params)]

    def job_counts(self, conn: Conn) -> dict[tuple[str, str], int]:
        rows = conn.execute("SELECT rule, state, COUNT(*) FROM replication_jobs GROUP BY rule, state")
        return {(row[0], row[1]): row[2] for row in rows}

    def oldest_open(self, conn: Conn) -> dict[str, float]:
        """Per rule, when the oldest change still waiting (pending or running) happened."""
        rows = conn.execute(
            "SELECT rule, MIN(created_at) FROM replication_jobs WHERE state IN ('pending', 'running') "
            "GROUP BY rule"
        )
        return {row[0]: row[1] for row in rows}

    def next_due(self, conn: Conn, rules: Sequence[str]) -> float | None:
        marks = ",".join("?" * len(rules)) or "NULL"
        row = conn.execute(
            "SELECT MIN(next_attempt_at) FROM replication_jobs WHERE state = 'pending' "
            f"AND rule IN ({marks})",
            tuple(rules),
        ).fetchone()
        return row[0]

    def forget_done(self, conn: Conn, before: float) -> int:
        return conn.execute(
            "DELETE FROM replication_jobs WHERE state = 'done' AND finished_at < ?", (before,)
        ).rowcount

    # -- per-rule counters ---------------------------------------------------------------
    def register_rule(self, conn: Conn, rule: str, direction: str, target: str) -> None:
        conn.execute(
            "INSERT INTO replication_stats (rule, direction, target) VALUES (?, ?, ?) "
            "ON CONFLICT (rule) DO UPDATE SET direction = excluded.direction, target = excluded.target",
            (rule, direction, target),
        )

    def add_stats(self, conn: Conn, rule: str, counts: dict[str, int]) -> None:
        unknown = set(counts) - set(STAT_COUNTERS)
        if unknown:
            raise ValueError(f"unknown replication counters: {sorted(unknown)}")
        if not counts:
            return
        conn.execute("INSERT OR IGNORE INTO replication_stats (rule) VALUES (?)", (rule,))
        sets = ", ".join(f"{name} = {name} + ?" for name in counts)
        conn.execute(f"UPDATE replication_stats SET {sets} WHERE rule = ?", (*counts.values(), rule))

    def record_outcome(self, conn: Conn, rule: str, error: str | None, now: float) -> None:
        conn.execute("INSERT OR IGNORE INTO replication_stats (rule) VALUES (?)", (rule,))
        if error is None:
            conn.execute("UPDATE replication_stats SET last_success_at = ? WHERE rule = ?", (now, rule))
        else:
            conn.execute(
                "UPDATE replication_stats SET failures = failures + 1, last_error = ?, last_error_at = ? "
                "WHERE rule = ?",
                (error[:2000], now, rule),
            )

    def stats(self, conn: Conn) -> dict[str, dict[str, Any]]:
        cur = conn.execute("SELECT * FROM replication_stats ORDER BY rule")
        names = [column[0] for column in cur.description]
        return {row[0]: dict(zip(names, row, strict=True)) for row in cur}

    # -- where digests were sent (cross-repository mounts on the target) -----------------
    def sent_to(self, conn: Conn, target: str, digest: str) -> str | None:
        row = conn.execute(
            "SELECT repository FROM replication_blobs WHERE target = ? AND digest = ?", (target, digest)
        ).fetchone()
        return row[0] if row else None

    def remember_sent(self, conn: Conn, target: str, digest: str, repository: str, now: float) -> None:
        conn.execute(
            "INSERT INTO replication_blobs (target, digest, repository, recorded_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (target, digest) DO UPDATE SET repository = excluded.repository, "
            "recorded_at = excluded.recorded_at",
            (target, digest, repository, now),
        )

    def forget_sent(self, conn: Conn, target: str, digest: str) -> None:
        conn.execute("DELETE FROM replication_blobs WHERE target = ? AND digest = ?", (target, digest))


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: int
    endpoint: str
    event_id: int
    attempt: int
    outcome: str  # delivered | failed | dead
    status_code: int | None
    error: str | None
    duration_ms: float | None
    at: float


class WebhookQueries:
    """Statements on ``webhook_deliveries``, the per-endpoint delivery log."""

    def log(
        self,
        conn: Conn,
        endpoint: str,
        event_id: int,
        attempt: int,
        outcome: str,
        status_code: int | None,
        error: str | None,
        duration_ms: float,
        now: float,
    ) -> None:
        conn.execute(
            "INSERT INTO webhook_deliveries (endpoint, event_id, attempt, outcome, status_code, error, "
            "duration_ms, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (endpoint, event_id, attempt, outcome, status_code, error and error[:1000], duration_ms, now),
        )

    def attempts(self, conn: Conn, endpoint: str, event_id: int) -> int:
        """Attempts already made at delivering an event (a restarted sender goes on counting)."""
        row = conn.execute(
            "SELECT COUNT(*) FROM webhook_deliveries WHERE endpoint = ? AND event_id = ?",
            (endpoint, event_id),
        ).fetchone()
        return int(row[0])

    def recent(self, conn: Conn, endpoint: str, limit: int) -> list[DeliveryRow]:
        rows = conn.execute(
            "SELECT id, endpoint, event_id, attempt, outcome, status_code, error, duration_ms, at "
            "FROM webhook_deliveries WHERE endpoint = ? ORDER BY id DESC LIMIT ?",
            (endpoint, limit),
        )
        return [DeliveryRow(*row) for row in rows]

    def summary(self, conn: Conn) -> dict[str, dict[str, Any]]:
        """Per endpoint: deliveries by outcome, and the last success and the last error."""
        found: dict[str, dict[str, Any]] = {}
        for endpoint, outcome, count, last in conn.execute(
            "SELECT endpoint, outcome, COUNT(*), MAX(at) FROM webhook_deliveries GROUP BY endpoint, outcome"
        ):
            entry = found.setdefault(endpoint, {"delivered": 0, "failed": 0, "dead": 0})
            entry[outcome] = count
            if outcome == "delivered":
                entry["last_delivered_at"] = last
        for endpoint, error, at in conn.execute(
            "SELECT endpoint, error, MAX(at) FROM webhook_deliveries WHERE outcome != 'delivered' "
            "GROUP BY endpoint"
        ):
            found[endpoint]["last_error"] = error
            found[endpoint]["last_error_at"] = at
        return found

    def forget_before(self, conn: Conn, before: float) -> int:
        return conn.execute("DELETE FROM webhook_deliveries WHERE at < ?", (before,)).rowcount
