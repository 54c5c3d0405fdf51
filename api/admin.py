"""The admin API under /admin/: GC runs, their reports, and storage use.

Off unless ``admin.token`` is set; every request must carry ``Authorization: Bearer
<token>`` (compared in constant time). Identities and per-user permissions replace
this with the access-control issue.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cargohold.config import parse_duration
from cargohold.engine import Registry
from cargohold.engine.jobs import JobAlreadyRunning
from cargohold.gc import collect


class AdminRequestInvalid(Exception):
    """A malformed admin request (400)."""


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="cargohold-admin"'} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@dataclass(frozen=True)
class GCDefaults:
    grace_seconds: float = 3600.0
    delete_orphan_referrers: bool = True


class AdminAPI:
    def __init__(self, registry: Registry, token: str, gc_defaults: GCDefaults) -> None:
        self.registry = registry
        self._token = token.encode()
        self.gc_defaults = gc_defaults

    def routes(self) -> list[Route]:
        return [
            Route("/admin/gc", self.run_gc, methods=["POST"]),
            Route("/admin/gc/runs", self.gc_runs, methods=["GET"]),
            Route("/admin/usage", self.usage, methods=["GET"]),
        ]

    def _authorized(self, request: Request) -> bool:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self._token)

    async def run_gc(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error(401, "admin token required")
        try:
            options = await _json_body(request)
            grace = options.get("grace")
            grace_seconds = parse_duration(grace) if grace is not None else self.gc_defaults.grace_seconds
        except (AdminRequestInvalid, ValueError) as exc:
            return _error(400, str(exc))
        try:
            report = await run_in_threadpool(
                lambda: collect(
                    self.registry,
                    grace_seconds=grace_seconds,
                    dry_run=bool(options.get("dry_run", False)),
                    delete_orphan_referrers=self.gc_defaults.delete_orphan_referrers,
                )
            )
        except JobAlreadyRunning:
            return _error(409, "a garbage collection is already running")
        return JSONResponse(report.summary())

    async def gc_runs(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error(401, "admin token required")
        limit = request.query_params.get("limit", "20")
        if not (limit.isascii() and limit.isdigit() and len(limit) < 7):
            return _error(400, "limit must be a positive integer")
        runs = await run_in_threadpool(self.registry.jobs.runs, "gc", min(int(limit), 1000))
        return JSONResponse([dataclasses.asdict(run) for run in runs])

    async def usage(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error(401, "admin token required")
        usage = await run_in_threadpool(self.registry.usage)
        return JSONResponse(
            {
                "blobs": usage.blobs,
                "stored_bytes": usage.stored_bytes,
                "logical_bytes": usage.logical_bytes,
                "dedup_savings_bytes": usage.dedup_savings_bytes,
                "repositories": [
                    {**dataclasses.asdict(repo), "shared_bytes": repo.shared_bytes}
                    for repo in usage.repositories
                ],
            }
        )


async def _json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body:
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        raise AdminRequestInvalid("the request body must be a JSON object") from None
    if not isinstance(value, dict):
        raise AdminRequestInvalid("the request body must be a JSON object")
    return value
