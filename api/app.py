"""The ASGI application: routes, error handlers, and the background chores of a worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from cargohold.api.accesslog import AccessLineBuffer, AccessLog
from cargohold.api.admin import AdminAPI, GCDefaults
from cargohold.api.admin_immutability import ImmutabilityAdminAPI
from cargohold.api.body import BodyTracker
from cargohold.api.distribution import DistributionAPI
from cargohold.api.errors import HANDLERS
from cargohold.config import RetentionPolicy
from cargohold.engine import Registry
from cargohold.engine.activity import FLUSH_INTERVAL_SECONDS
from cargohold.engine.errors import RegistryError
from cargohold.engine.pullthrough import PullThrough
from cargohold.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from cargohold.api.auth import AccessControl
    from cargohold.config import RateLimitSettings
    from cargohold.tokenbuckets import TokenBucketTable

log = logging.getLogger("cargohold.api")

UPLOAD_SWEEP_SECONDS = 600.0
AUDIT_PRUNE_SECONDS = 3600.0
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


async def _every(seconds: float, job: object, name: str) -> None:
    # Jittered so that several workers do not all wake at the same instant.
    await asyncio.sleep(seconds * random.uniform(0.1, 1.0))
    while True:
        try:
            await run_in_threadpool(job)  # type: ignore[arg-type]
        except Exception:
            log.exception("background job %s failed", name)
        await asyncio.sleep(seconds)


def create_app(
    registry: Registry,
    *,
    catalog_max_n: int = 1000,
    catalog_scan_budget: int = 20_000,
    tags_max_n: int = 10000,
    referrers_page_size: int = 1000,
    chunk_min_length: int = 0,
    log_format: str = "json",
    admin_token: str | None = None,
    gc_defaults: GCDefaults | None = None,
    retention_policies: Sequence[RetentionPolicy] = (),
    on_startup: Sequence[Callable[[], object]] = (),
    on_shutdown: Sequence[Callable[[], object]] = (),
    metrics: Callable[[], bytes] | None = None,
    access: AccessControl | None = None,
    cache: PullThrough | None = None,
    rate_limits: RateLimitSettings | None = None,
    rate_table: TokenBucketTable | None = None,
    trusted_proxies: Sequence[str] = (),
) -> ASGIApp:
    api = DistributionAPI(
        registry,
        catalog_max_n=catalog_max_n,
        catalog_scan_budget=catalog_scan_budget,
        tags_max_n=tags_max_n,
        referrers_page_size=referrers_page_size,
        chunk_min_length=chunk_min_length,
        cache=cache,
    )

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        try:
            await run_in_threadpool(registry.check)
        except RegistryError as exc:
            return JSONResponse({"status": "unavailable", "reason": exc.message}, status_code=503)
        return JSONResponse({"status": "ok"})

    access_lines = AccessLineBuffer()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for hook in on_startup:
            await run_in_threadpool(hook)
        chores = [
            asyncio.create_task(_every(1.0, access_lines.flush, "access log flush")),
            asyncio.create_task(_every(FLUSH_INTERVAL_SECONDS, registry.activity.flush, "activity flush")),
            asyncio.create_task(_every(UPLOAD_SWEEP_SECONDS, registry.expire_uploads, "upload expiry")),
        ]
        if access is not None:  # the audit log keeps auth.audit_keep
            chores.append(asyncio.create_task(_every(AUDIT_PRUNE_SECONDS, access.prune_audit, "audit prune")))
        try:
            yield
        finally:
            for task in chores:
                task.cancel()
            for hook in on_shutdown:
                await run_in_threadpool(hook)
            await run_in_threadpool(registry.activity.flush)
            access_lines.flush()

    routes = [
        Route("/v2/", api.base, methods=["GET", "HEAD"]),
        Route("/v2/_catalog", api.catalog, methods=["GET"]),
        Route("/v2/{rest:path}", api.dispatch, methods=METHODS),
        Route("/healthz", live, methods=["GET", "HEAD"]),
        Route("/readyz", ready, methods=["GET", "HEAD"]),
    ]
    if metrics is not None:

        async def scrape(request: Request) -> Response:
            return Response(await run_in_threadpool(metrics), media_type=METRICS_CONTENT_TYPE)

        routes.append(Route("/metrics", scrape, methods=["GET"]))
    if admin_token or access is not None:
        # With access control, identities with the admin role may use it; the token stays a break-glass.
        admin = AdminAPI(registry, admin_token or "", gc_defaults or GCDefaults(), retention_policies)
        routes.extend(admin.routes())
        routes.extend(ImmutabilityAdminAPI(registry, admin._authorized).routes())
    if access is not None:  # users, robots and the audit log, for the same admin callers
        from cargohold.api.auth_admin import IdentityAdminAPI

        routes.extend(IdentityAdminAPI(access, admin_token).routes())
    app: ASGIApp = Starlette(routes=routes, exception_handlers=HANDLERS, lifespan=lifespan)  # type: ignore[arg-type]
    app = BodyTracker(app)  # errors answered mid-body read the rest first (api/body.py)
    # Each section adds its wrapper only when configured: an open registry without rate
    # limits has nothing in front of the routes but the access log.
    if rate_limits is not None:
        from cargohold.api.ratelimit import RateLimiter

        assert rate_table is not None
        app = RateLimiter(app, rate_limits, rate_table)
    if access is not None:
        from cargohold.api.auth import AuthGate

        app = AuthGate(app, access)
    app = AccessLog(app, log_format, access_lines)
    if trusted_proxies:  # the client named by a trusted proxy, for the access log, audit and limits
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        app = ProxyHeadersMiddleware(app, list(trusted_proxies))  # type: ignore[arg-type]
    return app
