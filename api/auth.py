"""Access control in front of the registry: who is calling, and may they do this?

``AuthGate`` wraps the ASGI app when the ``auth:`` section is configured (without it the
app is not wrapped at all). For every request under ``/v2/`` it

1. finds the caller: a bearer token (a JWT from ``/auth/token``, see ``auth_tokens``),
   HTTP basic credentials (when ``auth.basic``), or nobody (anonymous);
2. works out the repository and the action from the path and method alone (pull for
   GET/HEAD, push for uploads and manifest PUT, delete for DELETE) — before the engine
   is asked anything, so the answer never depends on whether the repository exists;
3. lets the request through, or refuses it:

   * no credentials (or bad ones: wrong password, expired robot, tampered, expired or
     foreign token): **401 UNAUTHORIZED** with a ``WWW-Authenticate: Bearer`` challenge
     naming the realm, the service and the scope the request needs;
   * an anonymous token without the action: 401 with ``error="insufficient_scope"``;
   * an identity whose credentials or token do not carry the action: **403 DENIED** with a
     challenge carrying ``error="insufficient_scope"`` (so a client holding a token for
     another scope fetches a new one), the same whether or not the repository, tag or
     blob exists.

   Callers who may pull a repository see its 404s as usual; nobody else can tell a
   missing repository from a forbidden one.

``_catalog`` lists only repositories the caller may pull, and a cross-repository mount
only links from a repository the caller may pull (both through the
``cargohold.may_pull`` predicate this gate puts in the ASGI scope). Admin endpoints
accept an identity with the admin role (``cargohold.admin`` in the scope) besides the
break-glass ``admin.token``. Logins, pushes, deletes and admin changes are written to
the audit log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cargohold.api.auth_policy import ACTIONS, ALL, Policies
from cargohold.api.auth_tokens import InvalidToken, TokenAuthority
from cargohold.api.body import read_limited
from cargohold.api.cursors import CursorSeal
from cargohold.api.distribution import _ROUTES
from cargohold.api.errors import error_body, error_response
from cargohold.api.login_throttle import LoginThrottle, TooManyLogins
from cargohold.config import AuthSettings
from cargohold.engine.audit import AuditLog
from cargohold.engine.errors import NameInvalid
from cargohold.engine.identities import Identities, Identity
from cargohold.engine.names import check_name

ANONYMOUS = "anonymous"
MAX_SCOPES = 32
BASIC_CACHE_SECONDS = 30.0
BASIC_CACHE_SIZE = 1024
FAILED_CACHE_SECONDS = 10.0
MAX_FORM_BYTES = 64 * 1024
_KINDS = ("blobs/uploads", "blobs", "manifests", "tags", "referrers")
_HOST = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


@dataclass(frozen=True, slots=True)
class Target:
    """What a /v2/ request touches: ``kind`` is "base", "catalog", "unknown", or a route kind."""

    kind: str
    name: str | None = None
    action: str | None = None


def classify(method: str, path: str) -> Target:
    """The repository and action of a /v2/ request, from its path and method only."""
    if path in ("/v2", "/v2/"):
        return Target("base")
    if path == "/v2/_catalog":
        return Target("catalog")
    rest = path[len("/v2/") :]
    for pattern, _handlers in _ROUTES:
        match = pattern.fullmatch(rest)
        if match is None:
            continue
        name = match.group("name")
        # The same pattern the dispatcher will pick, so the name checked is the name served.
        kind = next((k for k in _KINDS if f"/{k}" in pattern.pattern), "unknown")
        if kind == "blobs/uploads":
            action = "push"  # starting, resuming, finishing and cancelling an upload
        elif method in ("GET", "HEAD"):
            action = "pull"
        elif method == "DELETE":
            action = "delete"
        else:
            action = "push"
        return Target(kind, name, action)
    return Target("unknown")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request. ``via``: "none" (no credentials), "basic" or "bearer"."""

    via: str
    identity: Identity | None
    claims: dict[str, Any] | None = None

    @property
    def actor(self) -> str:
        return self.identity.name if self.identity is not None else ANONYMOUS


class Unauthenticated(Exception):
    def __init__(self, error: str | None = None) -> None:
        self.error = error


class AccessControl:
    """Identities, policies and tokens: everything the gate and the token endpoint decide with."""

    def __init__(
        self, settings: AuthSettings, identities: Identities, audit: AuditLog, key_dir: Path
    ) -> None:
        self.settings = settings
        self.identities = identities
        self.audit = audit
        self.policies = Policies(settings)
        self.tokens = TokenAuthority(
            algorithm=settings.algorithm,
            issuer=settings.issuer,
            service=settings.service,
            key_dir=key_dir,
            secret=settings.secret,
        )
        self._basic_cache: dict[bytes, tuple[Identity, float]] = {}
        self._failed_cache: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self.cursors = CursorSeal(key_dir)  # catalog pages that end on a hidden name
        self.throttle = (
            LoginThrottle(key_dir / "logins.buckets", settings.failed_logins)
            if settings.failed_logins
            else None
        )

    def prune_audit(self) -> int:
        return self.audit.prune(self.settings.audit_keep)

    # -- credentials ------------------------------------------------------------------------
    def check_password(self, name: str, secret: str, address: str | None = None) -> Identity | None:
        """Verify basic credentials. argon2 is slow on purpose, so outcomes are remembered
        briefly per (name, secret) hash: clients send the same credentials on every request.
        Wrong passwords count against ``address`` (``LoginThrottle``): past the limit this
        raises ``TooManyLogins`` before checking anything."""
        key = hashlib.sha256(f"{name}\0{secret}".encode()).digest()
        now = time.monotonic()
        with self._lock:
            cached = self._basic_cache.get(key)
        if cached is not None and cached[1] > now:
            identity = cached[0]
            if identity.expires_at is None or identity.expires_at > time.time():
                return identity
        if self.throttle is not None:
            self.throttle.check(address)
        with self._lock:
            failed_until = self._failed_cache.get(key, 0.0)
        if failed_until > now:
            return None  # the same wrong pair again: do not pay (or let anyone make us pay) argon2
        identity = self.identities.verify(name, secret)
        if identity is None and self.throttle is not None:
            self.throttle.failed(address)
        with self._lock:
            cache = self._basic_cache if identity is not None else self._failed_cache
            if len(cache) >= BASIC_CACHE_SIZE:
                cache.clear()
            if identity is not None:
                self._basic_cache[key] = (identity, now + BASIC_CACHE_SECONDS)
            else:
                self._failed_cache[key] = now + FAILED_CACHE_SECONDS
        return identity

    def caller_from_claims(self, claims: dict[str, Any]) -> Caller:
        subject = claims["sub"]
        identity = None if subject == ANONYMOUS else Identity(subject, "token", bool(claims.get("adm")))
        return Caller("bearer", identity, claims)

    def actions(self, caller: Caller, repository: str) -> frozenset[str]:
        if caller.via != "bearer":
            return self.policies.allowed(caller.identity, repository)
        assert caller.claims is not None
        granted: set[str] = set()
        for entry in caller.claims["access"]:
            if (
                isinstance(entry, dict)
                and entry.get("type") == "repository"
                and entry.get("name") == repository
                and isinstance(entry.get("actions"), list)
            ):
                granted.update(a for a in entry["actions"] if a in ACTIONS)
        return frozenset(granted)

    # -- tokens -----------------------------------------------------------------------------
    def grant(self, identity: Identity | None, scopes: list[str]) -> list[dict[str, Any]]:
        """The access entries for the requested scopes: only what ``identity`` may do."""
        access: dict[str, set[str]] = {}
        for scope in scopes[:MAX_SCOPES]:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            name, requested = parsed
            allowed = self.policies.allowed(identity, name)
            wanted = ALL if "*" in requested else requested
            access.setdefault(name, set()).update(wanted & allowed)
        return [
            {"type": "repository", "name": name, "actions": sorted(actions)}
            for name, actions in access.items()
            if actions
        ]


def parse_scope(scope: str) -> tuple[str, frozenset[str]] | None:
    """``repository:<name>:<actions>`` → (name, actions); None for anything else."""
    if len(scope) > 400:
        return None
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if kind != "repository" or not name:
        return None
    try:
        check_name(name)
    except NameInvalid:
        return None
    wanted = frozenset(a for a in actions.split(",") if a in (*ACTIONS, "*"))
    return name, wanted


def _basic(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated() from None
    name, sep, secret = decoded.partition(":")
    if not sep:
        raise Unauthenticated()
    return name, secret


def _valid_name(name: str) -> bool:
    try:
        check_name(name)
    except NameInvalid:
        return False  # never echo an arbitrary path into a header
    return True


def _origin(scope: Scope, headers: Headers) -> str:
    """scheme://host[:port] as the client addressed us. A Host that is not a host name or
    address (a quote, a comma, a path) would break out of the challenge's quoted realm and
    add parameters of its own, so it is replaced by the address the connection came in on."""
    host = headers.get("host", "")
    if not _HOST.fullmatch(host):
        server = scope.get("server") or ("localhost", None)
        name = f"[{server[0]}]" if ":" in server[0] else server[0]
        host = name if server[1] is None else f"{name}:{server[1]}"
    return f"{scope.get('scheme', 'http')}://{host}"


def _client_address(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


class AuthGate:
    """The ASGI wrapper that enforces access control (see the module docstring)."""

    def __init__(self, app: ASGIApp, access: AccessControl) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/auth/token":
            response = await self.token_endpoint(Request(scope, receive))
            await response(scope, receive, send)
        elif path == "/v2" or path.startswith("/v2/"):
            await self.guard(scope, receive, send)
        elif path.startswith("/admin/"):
            await self.admin(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # -- who is calling ---------------------------------------------------------------------
    async def caller(self, headers: Headers, address: str | None) -> Caller:
        header = headers.get("authorization")
        if not header:
            return Caller("none", None)
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            try:
                claims = self.access.tokens.verify(value.strip())
            except InvalidToken:
                raise Unauthenticated("invalid_token") from None
            return self.access.caller_from_claims(claims)
        if scheme.lower() == "basic" and self.access.settings.basic:
            credentials = _basic(header)
            assert credentials is not None
            identity = await run_in_threadpool(self.access.check_password, *credentials, address)
            if identity is None:
                raise Unauthenticated()
            return Caller("basic", identity)
        raise Unauthenticated()

    # -- /v2/ -------------------------------------------------------------------------------
    async def guard(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        target = classify(scope["method"], scope["path"])
        try:
            caller = await self.caller(headers, _client_address(scope))
        except Unauthenticated as exc:
            await self.challenge(scope, headers, target, exc.error)(scope, receive, send)
            return
        except TooManyLogins as exc:
            await _too_many_logins(exc)(scope, receive, send)
            return
        if caller.identity is not None:
            scope["cargohold.identity"] = caller.identity.name  # rate limits per identity
        if target.kind in ("base", "catalog", "unknown"):
            if caller.via == "none":
                await self.challenge(scope, headers, target, None)(scope, receive, send)
                return
            if target.kind == "catalog":
                # By the identity's policy, not the token's scopes (a catalog token names no repository).
                policies, identity = self.access.policies, caller.identity
                scope["cargohold.may_pull"] = lambda name: "pull" in policies.allowed(identity, name)
                scope["cargohold.cursor_seal"] = self.access.cursors
            await self.app(scope, receive, send)
            return
        assert target.name is not None and target.action is not None
        if target.action not in self.access.actions(caller, target.name):
            await self.refuse(scope, headers, caller, target)(scope, receive, send)
            return
        scope["cargohold.may_pull"] = lambda name: "pull" in self.access.actions(caller, name)
        if target.kind not in ("manifests", "blobs") or scope["method"] not in ("PUT", "DELETE"):
            await self.app(scope, receive, send)
            return
        status = await _run_capturing_status(self.app, scope, receive, send)
        if status < 300:
            action = "push" if scope["method"] == "PUT" else "delete"
            reference = scope["path"].rsplit("/", 1)[1]
            await run_in_threadpool(
                self.access.audit.record,
                caller.actor,
                action,
                address=_client_address(scope),
                repository=target.name,
                detail={"kind": target.kind[:-1], "reference": reference[:200]},
            )

    def refuse(self, scope: Scope, headers: Headers, caller: Caller, target: Target) -> Response:
        assert target.name is not None and target.action is not None
        if caller.via == "none":
            return self.challenge(scope, headers, target, None)
        if caller.identity is None:  # an anonymous token: still "without credentials"
            return self.challenge(scope, headers, target, "insufficient_scope")
        # Every 403 carries a challenge with error="insufficient_scope": a HEAD answer has no
        # body, and without it docker cannot tell "denied" from a glitch and retries for a
        # minute. Clients that cache one token (oras-py) also fetch a new one only after a
        # 403 that names the scope, so a token that merely lacks it gets replaced.
        denied = _error(scope, 403, "DENIED", "requested access to the resource is denied")
        challenge = self.challenge(scope, headers, target, "insufficient_scope")
        denied.headers["WWW-Authenticate"] = challenge.headers["WWW-Authenticate"]
        return denied

    def challenge(self, scope: Scope, headers: Headers, target: Target, error: str | None) -> Response:
        settings = self.access.settings
        realm = settings.external_url or _origin(scope, headers)
        parts = [f'realm="{realm.rstrip("/")}/auth/token"', f'service="{settings.service}"']
        if target.name is not None and target.action is not None and _valid_name(target.name):
            wanted = {"pull": "pull", "push": "pull,push", "delete": "delete"}[target.action]
            parts.append(f'scope="repository:{target.name}:{wanted}"')
        elif target.kind == "catalog":
            parts.append('scope="registry:catalog:*"')
        if error:
            parts.append(f'error="{error}"')
        return _error(
            scope,
            401,
            "UNAUTHORIZED",
            "authentication required",
            {"WWW-Authenticate": "Bearer " + ",".join(parts)},
        )

    # -- /admin/ ----------------------------------------------------------------------------
    async def admin(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Mark callers with the admin role; the admin API itself still answers 401 to others
        (and still accepts its break-glass token, which is not a JWT)."""
        headers = Headers(scope=scope)
        actor = "admin-token"
        header = headers.get("authorization", "")
        if header.lower().startswith("basic ") or header.count(".") == 2:
            try:
                caller = await self.caller(headers, _client_address(scope))
            except Unauthenticated:
                caller = Caller("none", None)
            except TooManyLogins as exc:
                await _too_many_logins(exc)(scope, receive, send)
                return
            if self.access.policies.is_admin(caller.identity):
                scope["cargohold.admin"] = caller.actor
                actor = caller.actor
        if scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        status = await _run_capturing_status(self.app, scope, receive, send)
        if status < 300:
            await run_in_threadpool(
                self.access.audit.record,
                actor,
                "admin",
                address=_client_address(scope),
                detail={"method": scope["method"], "path": scope["path"][:200]},
            )

    # -- /auth/token ------------------------------------------------------------------------
    async def token_endpoint(self, request: Request) -> Response:
        settings = self.access.settings
        address = _client_address(request.scope)
        offline = False
        refresh: str | None = None
        if request.method == "GET":
            params = request.query_params
            scopes = [s for value in params.getlist("scope") for s in value.split(" ") if s]
            service = params.get("service")
            offline = params.get("offline_token") == "true"
            try:
                credentials = _basic(request.headers.get("authorization", ""))
            except Unauthenticated:
                return self._login_failed(address, None)
        elif request.method == "POST":
            # Bounded: anyone may POST here, and a form is a few hundred bytes.
            body = await read_limited(request, MAX_FORM_BYTES)
            if body is None:
                return _error(request.scope, 413, "UNSUPPORTED", "form too large")
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            scopes = [s for value in form.get("scope", []) for s in value.split(" ") if s]
            service = form.get("service", [""])[0] or None
            grant_type = form.get("grant_type", [""])[0]
            offline = form.get("access_type", [""])[0] == "offline"
            if grant_type == "password":
                credentials = (form.get("username", [""])[0], form.get("password", [""])[0])
                offline = True
            elif grant_type == "refresh_token":
                credentials, refresh = None, form.get("refresh_token", [""])[0]
            else:
                return _plain_error(400, "UNSUPPORTED", "grant_type must be password or refresh_token")
        else:
            return _plain_error(405, "UNSUPPORTED", "use GET or POST")
        if service is not None and service != settings.service:
            return _plain_error(400, "UNSUPPORTED", "unknown service")
        identity: Identity | None = None
        if refresh is not None:
            try:
                claims = self.access.tokens.verify(refresh, use="refresh")
            except InvalidToken:
                return self._login_failed(address, None)
            identity = await run_in_threadpool(self.access.identities.current, claims["sub"])
            if identity is None:
                return self._login_failed(address, claims["sub"])
        elif credentials is not None:
            try:
                identity = await run_in_threadpool(self.access.check_password, *credentials, address)
            except TooManyLogins as exc:
                return _too_many_logins(exc)
            if identity is None:
                await run_in_threadpool(
                    self.access.audit.record,
                    credentials[0][:80] or ANONYMOUS,
                    "login-failed",
                    address=address,
                )
                return self._login_failed(address, credentials[0])
        access = self.access.grant(identity, scopes)
        subject = identity.name if identity is not None else ANONYMOUS
        admin = self.access.policies.is_admin(identity)
        not_after = identity.expires_at if identity is not None else None
        issued = self.access.tokens.issue(
            subject, settings.token_ttl, access=access, admin=admin, not_after=not_after
        )
        body: dict[str, Any] = {
            "token": issued.token,
            "access_token": issued.token,
            "expires_in": issued.expires_in,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issued.issued_at)),
        }
        if offline and identity is not None:
            body["refresh_token"] = self.access.tokens.issue(
                subject, settings.refresh_token_ttl, use="refresh", not_after=not_after
            ).token
        if identity is not None:
            await run_in_threadpool(
                self.access.audit.record,
                subject,
                "login",
                address=address,
                detail={"access": [f"{a['name']}:{','.join(a['actions'])}" for a in access]},
            )
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    def _login_failed(self, address: str | None, name: str | None) -> Response:
        return _plain_error(401, "UNAUTHORIZED", "invalid credentials")


async def _run_capturing_status(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> int:
    status = 500

    async def capture(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    await app(scope, receive, capture)
    return status


def _error(
    scope: Scope, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    all_headers = {"Docker-Distribution-API-Version": "registry/2.0", **(headers or {})}
    if scope["method"] in ("POST", "PUT", "PATCH"):
        all_headers["Connection"] = "close"  # the refused body is still on the wire
    return Response(
        error_body(code, message), status_code=status, headers=all_headers, media_type="application/json"
    )


def _plain_error(status: int, code: str, message: str) -> Response:
    return Response(error_body(code, message), status_code=status, media_type="application/json")


def _too_many_logins(exc: TooManyLogins) -> Response:
    """429 with ``Retry-After``; the connection closes, as for any refused request with a body."""
    return error_response(
        exc, {"Retry-After": str(max(math.ceil(exc.retry_after), 1)), "Connection": "close"}
    )
