"""Identities through the admin API (with access control on): users, robot accounts, the audit log.

    GET    /admin/users                     users and robots (never a secret or a hash)
    POST   /admin/users    {"name", "password", "admin": false}
    DELETE /admin/users/{name}
    POST   /admin/robots   {"name", "description", "expires": "90d"}  → {"name", "secret"} (shown once)
    DELETE /admin/robots/{name}
    GET    /admin/audit?since=<seconds ago>&user=<name>&limit=<n>

Callers are those the rest of the admin API accepts: an identity with the admin role (the
gate in ``auth.py`` marks it) or the break-glass ``admin.token``. Changes land in the audit
log through the gate, like every other admin change.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cargohold.api.admin_common import AdminRequestInvalid, admin_authorized, admin_error, json_object_body
from cargohold.api.auth import AccessControl
from cargohold.config import parse_duration
from cargohold.engine.identities import IdentityError


class IdentityAdminAPI:
    def __init__(self, access: AccessControl, admin_token: str | None) -> None:
        self.access = access
        self._token = (admin_token or "").encode()

    def routes(self) -> list[Route]:
        return [
            Route("/admin/users", self.users, methods=["GET", "POST"]),
            Route("/admin/users/{name}", self.remove_user, methods=["DELETE"]),
            Route("/admin/robots", self.robots, methods=["GET", "POST"]),
            Route("/admin/robots/{name}", self.remove_robot, methods=["DELETE"]),
            Route("/admin/audit", self.audit, methods=["GET"]),
        ]

    def _authorized(self, request: Request) -> bool:
        return admin_authorized(request, self._token)

    async def users(self, request: Request) -> Response:
        if not self._authorized(request):
            return admin_error(401, "admin role or admin token required")
        identities = self.access.identities
        if request.method == "GET":
            listed = await run_in_threadpool(lambda: identities.list("user") + identities.list("robot"))
            return JSONResponse({"identities": [dataclasses.asdict(i) for i in listed]})
        body = await _json_object(request)
        if body is None:
            return admin_error(400, "the request body must be a JSON object")
        name, password = body.get("name"), body.get("password")
        if not isinstance(name, str) or not isinstance(password, str):
            return admin_error(400, 'send {"name": ..., "password": ...}')
        try:
            await run_in_threadpool(
                lambda: identities.add_user(name, password, admin=body.get("admin") is True)
            )
        except IdentityError as exc:
            return admin_error(409 if "exists" in str(exc) else 400, str(exc))
        return JSONResponse(
            {"name": name, "kind": "user", "admin": body.get("admin") is True}, status_code=201
        )

    async def remove_user(self, request: Request) -> Response:
        return await self._remove(request, "user")

    async def robots(self, request: Request) -> Response:
        if not self._authorized(request):
            return admin_error(401, "admin role or admin token required")
        identities = self.access.identities
        if request.method == "GET":
            listed = await run_in_threadpool(identities.list, "robot")
            return JSONResponse({"identities": [dataclasses.asdict(i) for i in listed]})
        body = await _json_object(request)
        if body is None or not isinstance(body.get("name"), str):
            return admin_error(400, 'send {"name": ..., "description": ..., "expires": "90d"}')
        try:
            expires = body.get("expires")
            lifetime = parse_duration(expires) if expires is not None else None
            name, secret = await run_in_threadpool(
                lambda: identities.add_robot(
                    body["name"], description=str(body.get("description") or ""), expires_in=lifetime
                )
            )
        except IdentityError as exc:
            return admin_error(409 if "exists" in str(exc) else 400, str(exc))
        except ValueError as exc:
            return admin_error(400, str(exc))
        return JSONResponse(
            {"name": name, "secret": secret}, status_code=201, headers={"Cache-Control": "no-store"}
        )

    async def remove_robot(self, request: Request) -> Response:
        return await self._remove(request, "robot")

    async def _remove(self, request: Request, kind: str) -> Response:
        if not self._authorized(request):
            return admin_error(401, "admin role or admin token required")
        name = request.path_params["name"]
        if not await run_in_threadpool(self.access.identities.remove, name, kind):
            return admin_error(404, f"no {kind} named {name[:80]}")
        return Response(status_code=204)

    async def audit(self, request: Request) -> Response:
        if not self._authorized(request):
            return admin_error(401, "admin role or admin token required")
        params = request.query_params
        try:
            since = float(params.get("since", "0"))
            limit = min(int(params.get("limit", "1000")), 10_000)
        except ValueError:
            return admin_error(400, "since and limit must be numbers")
        entries = await run_in_threadpool(
            lambda: self.access.audit.entries(
                since=time.time() - since if since > 0 else 0.0, actor=params.get("user"), limit=max(limit, 1)
            )
        )
        return JSONResponse({"entries": [e.as_dict() for e in entries]})


async def _json_object(request: Request) -> dict[str, Any] | None:
    try:
        return await json_object_body(request)
    except AdminRequestInvalid:
        return None
