"""Builds the running pieces (backend, metadata store, engine, ASGI app) from settings."""

from __future__ import annotations

import functools
import gc as python_gc  # the interpreter's cyclic collector, not cargohold.gc
from collections.abc import Callable

from cargohold.backends import Backend, FilesystemBackend
from cargohold.config import Settings, load_settings
from cargohold.engine import MetadataStore, Registry, RegistryLimits
from cargohold.engine.immutability import ImmutableTagRule
from cargohold.engine.quotas import Quota


def open_backend(settings: Settings) -> Backend:
    """The configured backend; cloud SDKs are imported only when their backend is chosen."""
    storage = settings.storage
    if storage.backend == "s3" and storage.s3 is not None:
        from cargohold.backends.s3 import S3Backend

        return S3Backend(**storage.s3.model_dump())
    if storage.backend == "gcs" and storage.gcs is not None:
        from cargohold.backends.gcs import GCSBackend

        return GCSBackend(**storage.gcs.model_dump())
    if storage.backend == "azure" and storage.azure is not None:
        from cargohold.backends.azure import AzureBackend

        return AzureBackend(**storage.azure.model_dump())
    return FilesystemBackend(settings.blob_root)


def describe_backend(settings: Settings) -> str:
    """One line for the start-up banner: which store this registry runs on."""
    storage = settings.storage
    if storage.backend == "s3" and storage.s3 is not None:
        where = f"s3://{storage.s3.bucket}/{storage.s3.prefix}" + (
            f" at {storage.s3.endpoint_url}" if storage.s3.endpoint_url else ""
        )
    elif storage.backend == "gcs" and storage.gcs is not None:
        where = f"gs://{storage.gcs.bucket}/{storage.gcs.prefix}"
    elif storage.backend == "azure" and storage.azure is not None:
        where = f"azure container {storage.azure.container}/{storage.azure.prefix}"
    else:
        where = str(settings.blob_root.absolute())
    return f"{storage.backend} ({where})"


def open_registry(settings: Settings, instrumented: bool = True) -> Registry:
    """The registry on the configured stores; ``instrumented`` counts backend calls for the
    server's metrics (a CLI command leaves them, and prometheus-client, alone)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    limits = RegistryLimits(
        upload_expiry_seconds=settings.uploads.expiry_hours * 3600,
        manifest_max_bytes=settings.limits.manifest_max_bytes,
        delete_enabled=settings.delete_enabled,
        redirect_pulls=settings.storage.redirect_pulls,
        redirect_expiry_seconds=settings.storage.redirect_expiry_seconds,
        read_only=settings.read_only,
        pull_event_sample_rate=settings.events.pull_sample_rate,
        pull_through_prefixes=settings.cache.prefixes if settings.cache is not None else (),
    )
    backend = open_backend(settings)
    if instrumented:
        from cargohold.metrics import InstrumentedBackend

        backend = InstrumentedBackend(backend)
    return Registry(
        MetadataStore(settings.metadata_path),
        backend,
        limits,
        immutable_tags=[
            ImmutableTagRule(tuple(rule.repositories), tuple(rule.tags)) for rule in settings.immutable_tags
        ],
        quotas=[Quota(q.repositories, int(q.bytes), q.warn_at) for q in settings.quotas],
    )


def create_asgi_app(settings: Settings | None = None):  # type: ignore[no-untyped-def]
    """The ASGI app for one worker process (the ASGI server calls this as a factory)."""
    from cargohold.api import GCDefaults, create_app
    from cargohold.gc import Pacing
    from cargohold.logs import configure_logging
    from cargohold.metrics import StoreCollector, exposition

    settings = settings or load_settings()
    configure_logging(settings.log_level)
    registry = open_registry(settings)
    start, stop = _scheduler_hooks(settings, registry)
    cache = open_cache(settings, registry)
    app = create_app(
        registry,
        catalog_max_n=settings.limits.catalog_max_n,
        catalog_scan_budget=settings.limits.catalog_scan_budget,
        tags_max_n=settings.limits.tags_max_n,
        referrers_page_size=settings.limits.referrers_page_size,
        chunk_min_length=settings.uploads.chunk_min_length,
        log_format=settings.log_format,
        admin_token=settings.admin.token,
        gc_defaults=GCDefaults(
            settings.gc.grace_period,
            settings.gc.delete_orphan_referrers,
            settings.gc.nice,
            Pacing(settings.gc.pause_ratio, settings.gc.busy_pause_ratio),
            settings.gc.leak_scan_every,
        ),
        retention_policies=settings.retention.policies,
        on_startup=[start],
        on_shutdown=[stop] if cache is None else [stop, cache.close],
        metrics=functools.partial(exposition, StoreCollector(registry)) if settings.metrics else None,
        access=open_access_control(settings, registry),
        cache=cache,
        rate_limits=settings.rate_limits,
        rate_table=open_rate_table(settings),
        trusted_proxies=settings.trusted_proxies,
    )
    # The modules, settings and app built so far live as long as the process: out of the
    # cyclic collector's sight, a full collection (a GC sweep makes many objects, so do
    # busy requests) no longer walks them all.
    python_gc.collect()
    python_gc.freeze()
    return app


def open_rate_table(settings: Settings):  # type: ignore[no-untyped-def]
    """The token buckets every worker shares, or None without a ``rate_limits:`` section."""
    if settings.rate_limits is None:
        return None
    from cargohold.api.ratelimit import RateLimiter
    from cargohold.tokenbuckets import TokenBucketTable

    return TokenBucketTable(
        settings.data_dir.absolute() / "ratelimit.buckets",
        settings.rate_limits.table_slots,
        horizon=RateLimiter.horizon(settings.rate_limits),
    )


def open_cache(settings: Settings, registry: Registry):  # type: ignore[no-untyped-def]
    """The pull-through cache of the ``cache:`` section, or None without one."""
    if settings.cache is None:
        return None
    from cargohold.replication.cache import PullThroughCache

    return PullThroughCache(registry, settings.cache)


def open_access_control(settings: Settings, registry: Registry):  # type: ignore[no-untyped-def]
    """The access control of the ``auth:`` section, or None (an open registry) without one."""
    if settings.auth is None:
        return None
    from cargohold.api.auth import AccessControl
    from cargohold.engine.audit import AuditLog
    from cargohold.engine.identities import Identities

    return AccessControl(
        settings.auth,
        Identities(registry.store),
        AuditLog(registry.store),
        key_dir=settings.data_dir.absolute() / "auth",
    )


def _scheduler_hooks(
    settings: Settings, registry: Registry
) -> tuple[Callable[[], object], Callable[[], object]]:
    """Start and stop the scheduler of this worker's periodic jobs (those with a schedule)."""
    from cargohold.gc import Pacing, collect
    from cargohold.gc.retention import active_policies, run_retention
    from cargohold.gc.schedule import ScheduledJob, start_scheduler

    jobs = []
    if settings.gc.schedule:
        gc = settings.gc
        jobs.append(
            ScheduledJob(
                "gc",
                gc.schedule,
                lambda: collect(
                    registry,
                    grace_seconds=gc.grace_period,
                    delete_orphan_referrers=gc.delete_orphan_referrers,
                    pacing=Pacing(gc.pause_ratio, gc.busy_pause_ratio),
                    nice=gc.nice,
                    leak_scan_every=gc.leak_scan_every,
                ),
            )
        )
    if settings.retention.schedule:
        configured = settings.retention.policies
        jobs.append(
            ScheduledJob(
                "retention",
                settings.retention.schedule,
                # Resolved at each run: policies stored through the admin API apply without a restart.
                lambda: run_retention(registry, active_policies(registry, configured)[0]),
            )
        )
    scrub = settings.scrub
    for name, crontab, full in (("scrub", scrub.schedule, False), ("scrub-full", scrub.full_schedule, True)):
        if crontab:
            jobs.append(
                ScheduledJob(
                    name,
                    crontab,
                    functools.partial(
                        registry.scrub,
                        full=full,
                        rate_bytes_per_second=scrub.rate,
                        max_seconds=scrub.max_duration,
                    ),
                )
            )
    if settings.backup.schedule:
        jobs.append(
            ScheduledJob(
                "backup", settings.backup.schedule, functools.partial(registry.backup, settings.backup.keep)
            )
        )
    replication = None
    if settings.replication is not None:
        from cargohold.replication import ReplicationService

        replication = ReplicationService(
            registry, settings.replication, event_keep_seconds=settings.events.keep
        )
        for rule in settings.replication.rules:
            if rule.schedule:  # pull rules mirror, push rules reconcile (under a lease per rule)
                jobs.append(
                    ScheduledJob(
                        f"replication-{rule.name}",
                        rule.schedule,
                        functools.partial(replication.reconcile, rule.name),
                    )
                )
    webhooks = None
    if settings.webhooks is not None:
        from cargohold.replication.webhooks import WebhookService

        webhooks = WebhookService(registry, settings.webhooks, event_keep_seconds=settings.events.keep)
    running: list[object] = []

    def start() -> None:
        scheduler = start_scheduler(jobs)
        if scheduler is not None:
            running.append(scheduler)
        if replication is not None:
            replication.start()  # works only while this process holds the replication lease
        if webhooks is not None:
            webhooks.start()  # likewise, with the webhooks lease

    def stop() -> None:
        for scheduler in running:
            scheduler.shutdown(wait=False)  # type: ignore[attr-defined]
        if replication is not None:
            replication.stop()
        if webhooks is not None:
            webhooks.stop()

    return start, stop
