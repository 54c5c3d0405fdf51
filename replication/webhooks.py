"""Webhooks: events POSTed to HTTP endpoints, signed, in order, at least once.

Each endpoint is an event consumer with its own cursor (``webhook:<name>``). Its events
go out strictly in event-id order (so in order per repository too): an event that fails
is retried with exponential backoff and holds back the ones after it, until it is
delivered or, after ``max_attempts``, logged as dead and skipped. The cursor moves past
an event only once it is settled, so a restart resends at most the event in flight:
receivers deduplicate by the event id (``X-Cargohold-Event-Id``, the CloudEvents ``id``).

Every attempt is a row of the delivery log (``webhook_deliveries``). The body is signed
with HMAC-SHA256 over its exact bytes: ``X-Cargohold-Signature-256: sha256=<hex>``.

Payload, ``format: cargohold`` (``Content-Type: application/json``)::

    {"id": 42, "time": "2026-01-02T03:04:05.678Z", "action": "push" | "tag" | "delete" | "untag" | "pull",
     "registry": "<webhooks.source>", "repository": "team/app", "digest": "sha256:...", "tag": "v1" | null,
     "mediaType": "...", "artifactType": "..." | null, "subject": "sha256:..." | null}

``quota.warning`` (a push took a quota namespace past its warning mark; digest, tag and
media type are null) adds ``"detail": {"quota": "team/**", "used_bytes", "limit_bytes",
"warn_bytes"}``; its CloudEvents ``subject`` is the repository pushed to.

``format: cloudevents``: a CloudEvents 1.0 structured event (``application/cloudevents+json``)
with ``type`` ``io.cargohold.<action>``, ``source`` ``<webhooks.source>``, ``subject``
``<repository>:<tag>`` or ``<repository>@<digest>``, and the payload above as ``data``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from cargohold.config import WebhookEndpoint, WebhookSettings
from cargohold.engine import Registry
from cargohold.engine.events import Event
from cargohold.engine.metadata_events import WebhookQueries
from cargohold.engine.names import repository_glob
from cargohold.replication.leased_loop import run_leased_loop

log = logging.getLogger(__name__)
LEASE = "webhooks"
SIGNATURE_HEADER = "X-Cargohold-Signature-256"
BATCH = 200
HOUSEKEEPING_SECONDS = 300.0


def sign(key: str, body: bytes) -> str:
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def payload(event: Event, registry_name: str) -> dict[str, Any]:
    return {
        "id": event.id,
        "time": _time(event.created_at),
        "action": event.action,
        "registry": registry_name,
        "repository": event.repository,
        "digest": event.digest,
        "tag": event.tag,
        "mediaType": event.media_type,
        "artifactType": event.artifact_type,
        "subject": event.subject,
        **({"detail": event.detail} if event.detail is not None else {}),
    }


def cloud_event(event: Event, source: str) -> dict[str, Any]:
    where = f"{event.repository}:{event.tag}" if event.tag else f"{event.repository}@{event.digest}"
    if event.digest is None and event.tag is None:  # quota.warning: about the repository
        where = event.repository
    return {
        "specversion": "1.0",
        "id": str(event.id),
        "source": source,
        "type": f"io.cargohold.{event.action}",
        "subject": where,
        "time": _time(event.created_at),
        "datacontenttype": "application/json",
        "data": payload(event, source),
    }


@dataclass
class _Endpoint:
    config: WebhookEndpoint
    repositories: list[re.Pattern[str]]
    client: httpx.Client
    next_attempt_at: float = 0.0

    @property
    def consumer(self) -> str:
        return f"webhook:{self.config.name}"

    def wants(self, event: Event) -> bool:
        config = self.config
        return (
            event.action in config.actions
            and any(glob.fullmatch(event.repository) for glob in self.repositories)
            and (not config.media_types or event.media_type in config.media_types)
        )


@dataclass
class DeliveryReport:
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    skipped: int = 0  # events the endpoint's filters leave out
    waiting: bool = False  # an event is backing off: the rest waits behind it
    errors: list[str] = field(default_factory=list)


class WebhookService:
    def __init__(
        self,
        registry: Registry,
        settings: WebhookSettings,
        *,
        event_keep_seconds: float = 7 * 86400.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.event_keep_seconds = event_keep_seconds
        self.queries = WebhookQueries()
        self.endpoints = {
            config.name: _Endpoint(
                config,
                [repository_glob(glob) for glob in config.repositories],
                httpx.Client(
                    verify=config.tls_verify,
                    timeout=config.timeout,
                    transport=transport,
                    headers={"User-Agent": "cargohold-webhooks"},
                ),
            )
            for config in settings.endpoints
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max(1, len(self.endpoints)), thread_name_prefix="webhook")
        self._running: dict[str, Future[DeliveryReport]] = {}
        self._housekept_at = 0.0
        self.register()

    def register(self) -> None:
        """A new endpoint receives the events from now on (not the whole kept history); one taken
        out of the config stops holding events back from pruning."""
        events = self.registry.events
        cursors = events.cursors()
        latest = events.latest_id()
        wanted = {endpoint.consumer for endpoint in self.endpoints.values()}
        for consumer in wanted - set(cursors):
            events.advance(consumer, latest)
        for consumer in cursors:
            if consumer.startswith("webhook:") and consumer not in wanted:
                events.forget(consumer)

    # -- delivering ------------------------------------------------------------------------
    def deliver(self, name: str) -> DeliveryReport:
        """Send the endpoint's pending events in order until it is caught up, or an event has to
        wait for its next attempt."""
        endpoint = self.endpoints[name]
        report = DeliveryReport()
        events = self.registry.events
        if time.time() < endpoint.next_attempt_at:
            report.waiting = True
            return report
        while not self._stop.is_set():
            cursor = events.cursor(endpoint.consumer)
            batch = events.after(cursor, BATCH)
            if not batch:
                return report
            settled = cursor
            for event in batch:
                if not endpoint.wants(event):
                    report.skipped += 1
                elif self._attempt(endpoint, event, report) == "failed":
                    if settled > cursor:
                        events.advance(endpoint.consumer, settled)
                    report.waiting = True
                    return report
                else:  # delivered, or dead: settled either way
                    events.advance(endpoint.consumer, event.id)
                settled = event.id
            events.advance(endpoint.consumer, settled)
        return report

    def _attempt(self, endpoint: _Endpoint, event: Event, report: DeliveryReport) -> str:
        config = endpoint.config
        attempt = self.queries.attempts(self.registry.store.read(), config.name, event.id) + 1
        if config.format == "cloudevents":
            document, content_type = cloud_event(event, self.settings.source), "application/cloudevents+json"
        else:
            document, content_type = payload(event, self.settings.source), "application/json"
        body = json.dumps(document, separators=(",", ":")).encode()
        headers = {
            **config.headers,
            "Content-Type": content_type,
            "X-Cargohold-Event-Id": str(event.id),
            "X-Cargohold-Event": event.action,
            "X-Cargohold-Delivery-Attempt": str(attempt),
        }
        key = config.key()
        if key:
            headers[SIGNATURE_HEADER] = sign(key, body)
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            response = endpoint.client.post(config.url, content=body, headers=headers)
            status = response.status_code
            if not 200 <= status < 300:
                error = f"answered {status}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        duration_ms = (time.monotonic() - started) * 1000
        if error is None:
            outcome = "delivered"
            report.delivered += 1
            endpoint.next_attempt_at = 0.0
        elif attempt >= config.max_attempts:
            outcome = "dead"
            report.dead += 1
            report.errors.append(f"event {event.id}: {error}")
            log.warning(
                "webhook %s gave up on event %s after %s attempts: %s", config.name, event.id, attempt, error
            )
        else:
            outcome = "failed"
            report.failed += 1
            report.errors.append(f"event {event.id}: {error}")
            delay = min(config.backoff * 2 ** (attempt - 1), config.backoff_max) * random.uniform(0.8, 1.2)
            endpoint.next_attempt_at = time.time() + delay
        with self.registry.store.write() as conn:
            self.queries.log(
                conn, config.name, event.id, attempt, outcome, status, error, duration_ms, time.time()
            )
        return outcome

    def deliver_all(self, timeout: float = 60.0) -> dict[str, DeliveryReport]:
        """Deliver every endpoint until caught up, waiting out backoffs (up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        reports: dict[str, DeliveryReport] = {}
        pending = set(self.endpoints)
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                report = self.deliver(name)
                total = reports.setdefault(name, DeliveryReport())
                for counter in ("delivered", "failed", "dead", "skipped"):
                    setattr(total, counter, getattr(total, counter) + getattr(report, counter))
                total.errors.extend(report.errors)
                total.waiting = report.waiting
                if not report.waiting:
                    pending.discard(name)
            if pending:
                time.sleep(0.05)
        return reports

    # -- life in ``cargohold serve`` ---------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)
        try:
            self.registry.jobs.release(LEASE)
        except Exception:
            log.exception("webhooks: could not release the lease")
        for endpoint in self.endpoints.values():
            endpoint.client.close()

    def _loop(self) -> None:
        run_leased_loop(
            self.registry.jobs, LEASE, self.settings.poll_interval, self._stop, self.step, "webhook"
        )

    def step(self) -> None:
        """Start a delivery run for each endpoint with news (one at a time per endpoint)."""
        latest = self.registry.events.latest_id()
        for name, endpoint in self.endpoints.items():
            running = self._running.get(name)
            if running is not None and not running.done():
                continue
            if (
                self.registry.events.cursor(endpoint.consumer) >= latest
                or time.time() < endpoint.next_attempt_at
            ):
                continue
            self._running[name] = self._pool.submit(self.deliver, name)
        if time.monotonic() - self._housekept_at > HOUSEKEEPING_SECONDS:
            self._housekept_at = time.monotonic()
            with self.registry.store.write() as conn:
                self.queries.forget_before(conn, time.time() - self.settings.keep_log)
            self.registry.events.prune(self.event_keep_seconds)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for endpoint in self.endpoints.values():
            endpoint.client.close()


def webhook_status(
    registry: Registry, endpoints: list[WebhookEndpoint] | None = None
) -> list[dict[str, Any]]:
    """Per endpoint: how far behind it is, and its deliveries by outcome."""
    conn = registry.store.read()
    summary = WebhookQueries().summary(conn)
    cursors = registry.events.cursors()
    latest = registry.events.latest_id()
    names = {name.removeprefix("webhook:") for name in cursors if name.startswith("webhook:")}
    names |= set(summary) | {endpoint.name for endpoint in endpoints or []}
    now = time.time()
    report = []
    for name in sorted(names):
        cursor = cursors.get(f"webhook:{name}", 0)
        oldest = registry.events.oldest_unread(f"webhook:{name}") if cursor < latest else None
        entry = {
            "endpoint": name,
            "cursor": cursor,
            "events_behind": max(latest - cursor, 0),
            "lag_seconds": round(max(now - oldest, 0.0), 3) if oldest is not None else 0.0,
            "delivered": 0,
            "failed": 0,
            "dead": 0,
            "last_delivered_at": None,
            "last_error": None,
            "last_error_at": None,
        }
        entry.update(summary.get(name, {}))
        report.append(entry)
    return report


def recent_deliveries(registry: Registry, endpoint: str, limit: int = 50) -> list[dict[str, Any]]:
    return [asdict(row) for row in WebhookQueries().recent(registry.store.read(), endpoint, limit)]
