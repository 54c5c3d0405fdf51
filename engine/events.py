"""Durable events: an outbox table written in the same transaction as each change.

Every manifest push, tag move, manifest delete and tag delete adds a row to ``events``
inside the write transaction that makes the change (``Registry.put_manifest`` and
``delete_manifest`` call ``record_push`` / ``record_delete``), so a committed change
always has its event and a rolled-back one never does, whatever crashes in between.

Actions and what the other fields hold::

    push    a manifest became present in a repository   digest, media_type, artifact_type, subject
    tag     a tag was created or moved to a manifest    tag, digest, media_type, artifact_type, subject
    delete  a manifest (and the tags on it) was deleted digest, media_type, artifact_type, subject
    untag   a tag was deleted (the manifest stays)      tag, digest (what it pointed to), media_type, ...
    pull    a manifest was fetched (sampled, off by default)   digest, tag (if pulled by tag), media_type
    quota.warning   a push took a quota namespace past its warning mark (``engine.quotas``),
            once per crossing     repository (the one pushed to), detail {quota, used_bytes,
            limit_bytes, warn_bytes}

A ``put_manifest`` of a new manifest with tags writes one ``push`` and then one ``tag``
per tag that moved, in that order (ids grow with commit order). Re-putting the same
bytes with the same tags writes nothing: it changed nothing.

Consumers (replication, webhooks) keep their own cursor, the last id they handled, in
``event_cursors``; they resume from it after a restart. ``consume`` runs a handler and
moves the cursor in one transaction, for handlers whose effect is itself a database
write (replication enqueues jobs: exactly once). Consumers with effects outside the
database (an HTTP delivery) handle first and advance after: at least once, so they
must be idempotent, and the event id is the idempotency key.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from cargohold.engine.metadata import Conn, MetadataStore, NewManifest
from cargohold.engine.metadata_events import Event, EventQueries, NewEvent

PUSH = "push"
TAG = "tag"
DELETE = "delete"
UNTAG = "untag"
PULL = "pull"
QUOTA_WARNING = "quota.warning"
ACTIONS = (PUSH, TAG, DELETE, UNTAG, PULL, QUOTA_WARNING)


class EventLog:
    """The registry's outbox: recording (inside the engine's transactions) and reading."""

    def __init__(self, store: MetadataStore, pull_sample_rate: float = 0.0) -> None:
        self.store = store
        self.queries = EventQueries()
        self.pull_sample_rate = pull_sample_rate

    # -- recording, inside the caller's write transaction ----------------------------------
    def record_push(
        self,
        conn: Conn,
        repository_id: int,
        repository: str,
        manifest: NewManifest,
        tags: Iterable[str],
        now: float,
    ) -> None:
        """Called before the manifest and its tags are written: compares with what is there."""
        facts = {
            "media_type": manifest.media_type,
            "artifact_type": manifest.artifact_type,
            "subject": manifest.subject,
        }
        events = []
        if self.queries.manifest_facts(conn, repository_id, manifest.digest) is None:
            events.append(NewEvent(PUSH, repository, manifest.digest, **facts))
        for tag in tags:
            if self.queries.tag_digest(conn, repository_id, tag) != manifest.digest:
                events.append(NewEvent(TAG, repository, manifest.digest, tag=tag, **facts))
        self.queries.insert(conn, events, now)

    def record_delete(
        self, conn: Conn, repository_id: int, repository: str, reference: str, by_digest: bool, now: float
    ) -> None:
        """Called before the delete: nothing is recorded if there is nothing to delete."""
        if by_digest:
            digest: str | None = reference
            tag = None
        else:
            tag = reference
            digest = self.queries.tag_digest(conn, repository_id, reference)
            if digest is None:
                return
        assert digest is not None
        facts = self.queries.manifest_facts(conn, repository_id, digest)
        if facts is None and by_digest:
            return
        event = NewEvent(
            DELETE if by_digest else UNTAG,
            repository,
            digest,
            tag=tag,
            media_type=facts.media_type if facts else None,
            artifact_type=facts.artifact_type if facts else None,
            subject=facts.subject if facts else None,
        )
        self.queries.insert(conn, [event], now)

    def record_quota_warning(self, conn: Conn, repository: str, detail: dict[str, Any], now: float) -> None:
        """In the transaction of the push that crossed the mark (so it commits with it)."""
        text = json.dumps(detail, separators=(",", ":"), sort_keys=True)
        self.queries.insert(conn, [NewEvent(QUOTA_WARNING, repository, None, detail=text)], now)

    def record_pull(self, repository: str, digest: str, tag: str | None, media_type: str) -> None:
        """Sampled pull events (``pull_sample_rate``: 0 is off, 1 is every pull). A pull changes
        nothing, so this is its own small transaction, after the read."""
        if self.pull_sample_rate <= 0 or random.random() >= self.pull_sample_rate:
            return
        with self.store.write() as conn:
            self.queries.insert(conn, [NewEvent(PULL, repository, digest, tag, media_type)], time.time())

    # -- reading and consuming ---------------------------------------------------------------
    def after(self, last_id: int, limit: int = 500) -> list[Event]:
        return self.queries.after(self.store.read(), last_id, limit)

    def latest_id(self) -> int:
        return self.queries.latest_id(self.store.read())

    def cursor(self, consumer: str) -> int:
        """The last event id ``consumer`` handled (0: it starts at the oldest kept event)."""
        return self.queries.cursor(self.store.read(), consumer) or 0

    def cursors(self) -> dict[str, int]:
        return self.queries.cursors(self.store.read())

    def advance(self, consumer: str, last_id: int) -> None:
        with self.store.write() as conn:
            self.queries.set_cursor(conn, consumer, last_id, time.time())

    def forget(self, consumer: str) -> None:
        """Drop a consumer that no longer exists, so it stops holding events back from pruning."""
        with self.store.write() as conn:
            self.queries.forget_cursor(conn, consumer)

    def consume(self, consumer: str, handle: Callable[[Conn, list[Event]], None], limit: int = 500) -> int:
        """Hand the next events to ``handle`` and move the cursor past them, in one write
        transaction: either both happen or neither. Returns how many events were handled."""
        with self.store.write() as conn:
            last_id = self.queries.cursor(conn, consumer) or 0
            events = self.queries.after(conn, last_id, limit)
            if not events:
                return 0
            handle(conn, events)
            self.queries.set_cursor(conn, consumer, events[-1].id, time.time())
        return len(events)

    def oldest_unread(self, consumer: str) -> float | None:
        """When the oldest event ``consumer`` has not handled yet happened (None: none waits)."""
        conn = self.store.read()
        return self.queries.oldest_after(conn, self.queries.cursor(conn, consumer) or 0)

    def prune(self, keep_seconds: float, now: float | None = None) -> int:
        """Delete events older than ``keep_seconds`` that every consumer has handled.

        A consumer that falls further behind than that keeps the events it has not read
        (nothing is lost); with no consumer at all, events simply age out.
        """
        now = time.time() if now is None else now
        with self.store.write() as conn:
            cursors = self.queries.cursors(conn)
            up_to = min(cursors.values()) if cursors else self.queries.latest_id(conn)
            return self.queries.prune(conn, up_to, now - keep_seconds)
