"""The admin API under /admin/: GC runs, their reports, storage use, retention, replication status.

Off unless ``admin.token`` is set or access control (``auth:``) is on. Every request
must carry ``Authorization: Bearer <admin.token>`` (compared in constant time, the
break-glass) or, with access control, the credentials or a token of an identity with the
admin role (``api/auth.py`` marks those requests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cargohold.api.admin_common import AdminRequestInvalid, admin_authorized, admin_error, json_object_body
from cargohold.config import RetentionPolicy, parse_duration
from cargohold.engine import Registry
from cargohold.engine.jobs import JobAlreadyRunning
from cargohold.gc import Pacing, collect
from cargohold.gc.retention import (
    active_policies,
    forget_stored_policies,
    parse_policies,
    run_retention,
    store_policies,
)
from cargohold.replication.status import replication_status
from cargohold.replication.webhooks import webhook_status


@dataclass(frozen=True)
class GCDefaults:
    grace_seconds: float = 3600.0
    delete_orphan_referrers: bool = True
    nice: int = 0
    pacing: Pacing = field(default_factory=Pacing)
    leak_scan_every: float = 0.0


class AdminAPI:
    def __init__(
        self,
        registry: Registry,
        token: str,
        gc_defaults: GCDefaults,
        retention_policies: Sequence[RetentionPolicy] = (),
    ) -> None:
        self.registry = registry
        self._token = token.encode()
        self.gc_defaults = gc_defaults
        self.configured_policies = list(retention_policies)  # the config file's

    def routes(self) -> list[Route]:
        return [
            Route("/admin/gc", self.run_gc, methods=["POST"]),
            Route("/admin/gc/runs", self.gc_runs, methods=["GET"]),
            Route("/admin/usage", self.usage, methods=["GET"]),
            Route("/admin/read-only", self.read_only, methods=["GET", "PUT"]),
            Route("/admin/retention/policies", self.retention_policies, methods=["GET", "PUT", "DELETE"]),
            Route("/admin/retention/plan", self.retention_plan, methods=["POST"]),
            Route("/admin/retention/apply", self.retention_apply, methods=["POST"]),
            Route("/admin/replication/status", self.replication_status, methods=["GET"]),
            Route("/admin/webhooks/status", self.webhooks_status, methods=["GET"]),
        ]

    def _authorized(self, request: Request) -> bool:
        return admin_authorized(request, self._token)

    async def run_gc(self, request: Request) -> Response:
        if not self._authorized(request):
            return admin_error(401, "admin token required")
        try:
            options = await json_object_body(request)
            grace = options.get("grace")
            grace_seconds = parse_duration(grace) if grace is not None else self.gc_defaults.grace_seconds
            scan_leaks = options.get("scan_leaks", False)
            if not isinstance(scan_leaks, bool):
                raise AdminRequestInvalid("scan_leaks must be true or false")
        except (AdminRequestInvalid, ValueError) as exc:
            return admin_error(400, str(exc))
        try:
            report = await run_in_threadpool(
                lambda: collect(
                    self.registry,
                    grace_seconds=grace_seconds,
                    dry_run=bool(options.get("dry_run", False)),
                    delete_orphan_referrers=self.gc_defaults.delete_orphan_referrers,
                    nice=self.gc_defaults.nice,
                    pacing=self.gc_defaults.pacing,
                    leak_scan_every=0.0 if scan_leaks else self.gc_defaults.leak_scan_every,
                )
            )
        except JobAlreadyRunning:
            return admin_error(409, "a garbage collection is already running")
        return JSONResponse(report.summary())

    async def gc_runs(self, request: Request) -> Response:
        if not self._authorized(request):
            return admin_error(401, "admin token required")
        limit = request.query_params.get("limit", "20")
        if not (limit.isascii() and limit.isdigit() and len(limit) < 7):
            return admin_error(400, "limit must be a positive integer")
        runs = await run_in_threadpool(self.registry.jobs.runs, "gc", min(int(limit), 1000))
        return JSONResponse([dataclasses.asdict(run) for run in runs])

    async def read_only(self, request: Request) -> Response:
        """GET: is the registry read-only? PUT {"enabled": true|false|null}: switch it for
        every process (null goes back to the config file's value)."""
        if not self._authorized(request):
            return admin_error(401, "admin token required")
        switch = self.registry.read_only
        if request.method == "PUT":
            try:
                enabled = (await json_object_body(request)).get("enabled", "missing")
            except AdminRequestInvalid as exc:
                return admin_error(400, str(exc))
            if enabled not in (True, False, None):
                return admin_error(400, 'send {"enabled": true}, {"enabled": false} or {"enabled": null}')
            await run_in_threadpool(switch.set, enabled)
        return JSONResponse(
            {"read_only": await run_in_threadpool(switch.enabled), "config_default": switch.default}
        )

    async def usage(self, request: Request) -> Response:
        if not self._authorized(request):
            return admin_error(401, "admin token required")
        usage = await run_in_threadpool(self.registry.usage)
        return JSONResponse(usage.as_dict())

    async def retention_policies(self, request: Request) -> Response:
        """GET the policies in force; PUT {"policies": [...]} to override the config file's
        (stored in the metadata store); DELETE to go back to the config file's."""
        if not self._authorized(request):
            return admin_error(401, "admin token required")
        if request.method == "PUT":
            try:
                policies = parse_policies((await json_object_body(request)).get("policies"))
            except (AdminRequestInvalid, ValidationError) as exc:
                return admin_error(400, str(exc))
            await run_in_threadpool(store_policies, self.registry, policies)
        elif request.method == "DELETE":
            await run_in_threadpool(forget_stored_policies, self.registry)
        policies, source = await run_in_threadpool(active_policies, self.registry, self.configured_policies)
        return JSONResponse({"source": source, "policies": [p.model_dump(mode="json") for p in policies]})

    async def retention_plan(self, request: Request) -> Response:
        """A dry run of the policies in force, or of {"policies": [...]} to try before storing them."""
        if not self._authorized(request):
            return admin_error(401, "admin token required")
        try:
            trial = (await json_object_body(request)).get("policies")
            policies = parse_policies(trial) if trial is not None else None
        except (AdminRequestInvalid, ValidationError) as exc:
            return admin_error(400, str(exc))
        return await self._run_retention(policies, dry_run=True)

    async def retention_apply(self, request: Request) -> Response:
        if not self._authorized(request):
            return admin_error(401, "admin token required")
        return await self._run_retention(None, dry_run=False)

    async def replication_status(self, request: Request) -> Response:
        """Per replication rule: lag, job counts, bytes sent and skipped, failures."""
        if not self._authorized(request):
            return admin_error(401, "admin token required")
        rules = await run_in_threadpool(replication_status, self.registry)
        return JSONResponse({"rules": rules})

    async def webhooks_status(self, request: Request) -> Response:
        """Per webhook endpoint: events behind, lag, deliveries by outcome, the last error."""
        if not self._authorized(request):
            return admin_error(401, "admin token required")
        endpoints = await run_in_threadpool(webhook_status, self.registry)
        return JSONResponse({"endpoints": endpoints})

    async def _run_retention(self, policies: list[RetentionPolicy] | None, dry_run: bool) -> Response:
        def run() -> dict[str, Any]:
            chosen = policies
            if chosen is None:
                chosen = active_policies(self.registry, self.configured_policies)[0]
            return run_retention(self.registry, chosen, dry_run=dry_run).summary()

        try:
            return JSONResponse(await run_in_threadpool(run))
        except JobAlreadyRunning:
            return admin_error(409, "a retention run is already going")
