"""Immutable tags through the admin API: the rules in force, and the one override.

    GET    /admin/immutable-tags          {"source": "config"|"admin", "rules": [{"repositories", "tags"}]}
    PUT    /admin/immutable-tags          {"rules": [...]}: replaces the config file's rules everywhere
    DELETE /admin/immutable-tags          back to the config file's rules
    DELETE /admin/immutable-tags/override/<repository>/manifests/<tag or digest>
           deletes the tag (or the manifest and its tags) even though an immutable tag protects it

The override is the only way past an immutable tag (to "move" one: override-delete it, then
push again). It is written to the audit log, with the caller and the tags it overrode, in
the transaction of the delete. Callers are those the rest of the admin API accepts.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cargohold.api.admin_common import AdminRequestInvalid, admin_error, json_object_body
from cargohold.config import ImmutableTagRule as RuleSettings
from cargohold.engine import Registry
from cargohold.engine.immutability import ImmutableTagRule, Override

_RULES = TypeAdapter(list[RuleSettings])


class ImmutabilityAdminAPI:
    def __init__(self, registry: Registry, authorized: Callable[[Request], bool]) -> None:
        self.registry = registry
        self._authorized = authorized  # the admin API's own check (admin role or admin token)

    def routes(self) -> list[Route]:
        return [
            Route("/admin/immutable-tags", self.rules, methods=["GET", "PUT", "DELETE"]),
            Route(
                "/admin/immutable-tags/override/{name:path}/manifests/{reference}",
                self.override,
                methods=["DELETE"],
            ),
        ]

    async def rules(self, request: Request) -> Response:
        if not self._authorized(request):
            return admin_error(401, "admin token required")
        tags = self.registry.immutable_tags
        if request.method == "PUT":
            try:
                parsed = _RULES.validate_python((await json_object_body(request)).get("rules"))
            except (AdminRequestInvalid, ValidationError) as exc:
                return admin_error(400, str(exc))
            rules = [ImmutableTagRule(tuple(r.repositories), tuple(r.tags)) for r in parsed]
            await run_in_threadpool(tags.put, rules)
        elif request.method == "DELETE":
            await run_in_threadpool(tags.forget)
        rules, source = await run_in_threadpool(tags.rules)
        return JSONResponse({"source": source, "rules": [rule.as_dict() for rule in rules]})

    async def override(self, request: Request) -> Response:
        if not self._authorized(request):
            return admin_error(401, "admin token required")
        actor = request.scope.get("cargohold.admin") or "admin-token"
        address = request.client.host if request.client else None
        await run_in_threadpool(
            lambda: self.registry.delete_manifest(
                request.path_params["name"],
                request.path_params["reference"],
                override=Override(str(actor), address),
            )
        )
        return Response(status_code=202, headers={"Content-Length": "0"})
