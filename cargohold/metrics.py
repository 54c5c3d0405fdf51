"""Prometheus metrics: what every worker counts, and what the store says at scrape time.

Worker processes each count their own requests and backend calls; prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set up by ``cargohold serve`` before
the workers start) adds them up at scrape time. Figures about the store itself (blobs
and bytes stored, dedup savings, open uploads, the last GC run) come from the metadata
store when scraped, so they are the same whichever worker answers.

Metric names:
  cargohold_http_requests_total{method,route,status}
  cargohold_http_request_duration_seconds{method,route}          histogram
  cargohold_http_received_bytes_total{route} / _sent_bytes_total{route}
  cargohold_backend_operation_duration_seconds{operation}        histogram
  cargohold_backend_errors_total{operation}
  cargohold_rate_limited_requests_total{kind,by}                 kind: pull|push, by: identity|address
  cargohold_blobs_stored, cargohold_stored_bytes, cargohold_logical_bytes,
  cargohold_dedup_savings_bytes, cargohold_upload_sessions_open,
  cargohold_job_runs_total{kind,status}, cargohold_blobs_quarantined,
  cargohold_scrub_last_run_{blobs_checked,bytes_read},
  cargohold_last_job_run_{duration_seconds,bytes_freed,objects_deleted}{kind}
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cargohold.backends.base import Backend, BackendError

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REQUESTS = Counter("cargohold_http_requests", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "cargohold_http_request_duration_seconds",
    "HTTP request duration",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
RECEIVED = Counter("cargohold_http_received_bytes", "Request body bytes", ["route"])
SENT = Counter("cargohold_http_sent_bytes", "Response body bytes", ["route"])
BACKEND_LATENCY = Histogram(
    "cargohold_backend_operation_duration_seconds", "Backend call duration", ["operation"]
)
BACKEND_ERRORS = Counter("cargohold_backend_errors", "Backend calls that failed", ["operation"])
RATE_LIMITED = Counter(
    "cargohold_rate_limited_requests", "Requests refused with 429 by a rate limit", ["kind", "by"]
)

_ROUTES = [
    (re.compile(r"^/v2/?$"), "base"),
    (re.compile(r"^/v2/_catalog$"), "catalog"),
    (re.compile(r"^/v2/.+/blobs/uploads/"), "blob_upload"),
    (re.compile(r"^/v2/.+/blobs/"), "blob"),
    (re.compile(r"^/v2/.+/manifests/"), "manifest"),
    (re.compile(r"^/v2/.+/tags/list$"), "tags"),
    (re.compile(r"^/v2/.+/referrers/"), "referrers"),
    (re.compile(r"^/admin/"), "admin"),
    (re.compile(r"^/(healthz|readyz|metrics)$"), "operations"),
]


def route_of(path: str) -> str:
    """A low-cardinality route label (never the repository name or the digest)."""
    for pattern, name in _ROUTES:
        if pattern.search(path):
            return name
    return "other"


def observe_request(method: str, path: str, status: int, received: int, sent: int, seconds: float) -> None:
    route = route_of(path)
    REQUESTS.labels(method, route, str(status)).inc()
    LATENCY.labels(method, route).observe(seconds)
    if received:
        RECEIVED.labels(route).inc(received)
    if sent:
        SENT.labels(route).inc(sent)


def exposition(store_collector: Any) -> bytes:
    """The text every scrape gets: all workers' counters plus the store's figures."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    registry.register(store_collector)
    try:
        return generate_latest(registry)
    finally:
        registry.unregister(store_collector)


class StoreCollector:
    """Reads the store's figures from the metadata at scrape time (cached a few seconds)."""

    def __init__(self, registry: Any, cache_seconds: float = 5.0) -> None:
        self.registry = registry
        self.cache_seconds = cache_seconds
        self._cached: tuple[float, list[Any]] = (0.0, [])

    def collect(self) -> Iterator[Any]:
        taken_at, families = self._cached
        if time.monotonic() - taken_at > self.cache_seconds:
            families = list(self._families())
            self._cached = (time.monotonic(), families)
        yield from families

    def _families(self) -> Iterator[Any]:
        usage = self.registry.usage()
        yield GaugeMetricFamily("cargohold_blobs_stored", "Live blobs (each digest once)", value=usage.blobs)
        yield GaugeMetricFamily(
            "cargohold_stored_bytes", "Bytes stored (each digest once)", value=usage.stored_bytes
        )
        yield GaugeMetricFamily(
            "cargohold_logical_bytes",
            "Bytes the repositories would take without dedup",
            value=usage.logical_bytes,
        )
        yield GaugeMetricFamily(
            "cargohold_dedup_savings_bytes", "Bytes saved by global dedup", value=usage.dedup_savings_bytes
        )
        yield GaugeMetricFamily(
            "cargohold_upload_sessions_open",
            "Upload sessions in progress",
            value=self.registry.open_uploads(),
        )
        runs = CounterMetricFamily(
            "cargohold_job_runs", "Job runs by kind and outcome", labels=["kind", "status"]
        )
        last_duration = GaugeMetricFamily(
            "cargohold_last_job_run_duration_seconds", "Duration of the last run", labels=["kind"]
        )
        last_bytes = GaugeMetricFamily(
            "cargohold_last_job_run_bytes_freed", "Bytes the last run freed", labels=["kind"]
        )
        last_objects = GaugeMetricFamily(
            "cargohold_last_job_run_objects_deleted", "Objects the last run deleted", labels=["kind"]
        )
        for (kind, status), count in self.registry.jobs.run_counts().items():
            runs.add_metric([kind, status], count)
        for kind in ("gc", "retention"):
            recent = [run for run in self.registry.jobs.runs(kind, 5) if run.finished_at and not run.dry_run]
            if recent:
                run = recent[0]
                last_duration.add_metric([kind], run.finished_at - run.started_at)
                last_bytes.add_metric(
                    [kind], run.summary.get("total_bytes", run.summary.get("bytes_freed", 0))
                )
                objects = run.summary.get("blobs_deleted", 0) + run.summary.get("leaks_deleted", 0)
                last_objects.add_metric([kind], objects or run.summary.get("manifests_deleted", 0))
        yield from (runs, last_duration, last_bytes, last_objects)
        yield from self._scrub_families()

    def _scrub_families(self) -> Iterator[Any]:
        """Scrub progress (the last run's blobs and bytes read) and the damage it found."""
        checked = GaugeMetricFamily("cargohold_scrub_last_run_blobs_checked", "Blobs the last scrub re-read")
        read = GaugeMetricFamily("cargohold_scrub_last_run_bytes_read", "Bytes the last scrub re-read")
        recent = [run for run in self.registry.jobs.runs("scrub", 1) if run.finished_at]
        if recent:
            checked.add_metric([], recent[0].summary.get("blobs_checked", 0))
            read.add_metric([], recent[0].summary.get("bytes_read", 0))
        yield checked
        yield read
        yield GaugeMetricFamily(
            "cargohold_blobs_quarantined",
            "Blobs taken out of service (corrupt or missing bytes)",
            value=self.registry.quarantined_blobs(),
        )


class InstrumentedBackend:
    """Wraps a backend to time every call and count failures, by operation."""

    _TIMED = ("put", "read", "stat", "delete", "delete_many", "create_staged", "abort_staged", "check")

    def __init__(self, inner: Backend) -> None:
        self._inner = inner
        self.name = inner.name

    def __getattr__(self, attribute: str) -> Any:
        value = getattr(self._inner, attribute)
        if attribute in self._TIMED:
            return _timed(attribute, value)
        if attribute == "open_staged":
            return lambda *args: _timed_context("open_staged", value(*args))
        return value


def _timed(operation: str, fn: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except BackendError:
            BACKEND_ERRORS.labels(operation).inc()
            raise
        finally:
            BACKEND_LATENCY.labels(operation).observe(time.perf_counter() - started)

    return call


@contextmanager
def _timed_context(operation: str, manager: Any) -> Iterator[Any]:
    started = time.perf_counter()
    try:
        with manager as value:
            BACKEND_LATENCY.labels(operation).observe(time.perf_counter() - started)
            yield value
    except BackendError:
        BACKEND_ERRORS.labels(operation).inc()
        raise
