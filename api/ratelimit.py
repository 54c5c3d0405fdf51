"""Rate limits on pulls and pushes, per identity and per client address.

``RateLimiter`` wraps the app when the ``rate_limits:`` section is configured (without it
nothing is in front and nothing is paid). With access control on it sits inside
``AuthGate``, which names the caller in the scope (``cargohold.identity``); anonymous
callers, and every caller of an open registry, are limited by address only. Requests
that never reach the registry (401s from the gate) are not counted.

What counts as what, from the method and path alone: a *pull* is a GET or HEAD under
``/v2/`` (manifests, blobs, tag lists, referrers, the catalog); a *push* is anything on an
upload session, a manifest PUT, and deletes. (Deliberately coarser than the router, so
that it costs nothing: a path no route knows still counts, as whatever its method is.)
``/v2/`` itself, health, metrics and admin endpoints are never limited.

The address is the connection's peer, or the client a proxy listed in ``trusted_proxies``
names in ``X-Forwarded-For`` (the scope is rewritten in front of the access log, see
``create_app``); IPv6 clients are counted per /64, the block a single host usually gets.

A refused request gets **429 TOOMANYREQUESTS** with ``Retry-After`` in whole seconds (at
least 1). The buckets live in a table every worker shares (``cargohold.tokenbuckets``),
so a limit holds for the whole server, whatever the number of workers.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from cargohold.api.errors import error_response
from cargohold.config import RateLimit, RateLimitSettings, parse_rate
from cargohold.engine.errors import TooManyRequests
from cargohold.metrics import RATE_LIMITED
from cargohold.tokenbuckets import TokenBucketTable

IDENTITY = "cargohold.identity"  # set by AuthGate: the caller's name, when there is one
LOCK_PATIENCE = 0.1  # seconds a request waits for the shared table before going through
REFUSED_MEMORY = 4096  # empty buckets a worker remembers, to refuse floods without the table


@dataclass(frozen=True, slots=True)
class Bucket:
    """One configured limit: ``rate`` requests a second, ``burst`` at once."""

    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class ClassLimits:
    identity: Bucket | None
    address: Bucket | None


def _limits(config: RateLimit) -> ClassLimits:
    def bucket(rate: str | None) -> Bucket | None:
        if rate is None:
            return None
        requests, seconds = parse_rate(rate)
        return Bucket(requests / seconds, config.burst or max(math.ceil(requests), 1))

    return ClassLimits(bucket(config.per_identity), bucket(config.per_address))


def request_kind(method: str, path: str) -> str | None:
    """The rate-limit class of a request: pull, push, or None (never limited)."""
    if not path.startswith("/v2/") or path == "/v2/":
        return None
    if method in ("GET", "HEAD") and "/blobs/uploads/" not in path:
        return "pull"
    return "push"


@functools.lru_cache(maxsize=4096)
def address_key(host: str) -> str:
    """The bucket name of a client address: itself for IPv4, its /64 for IPv6."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


class RateLimiter:
    """The ASGI wrapper (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: RateLimitSettings, table: TokenBucketTable) -> None:
        self.app = app
        self.table = table
        self.limits = {"pull": _limits(settings.pull), "push": _limits(settings.push)}
        self._refused: dict[str, float] = {}  # bucket key -> refusing until (monotonic)

    @staticmethod
    def horizon(settings: RateLimitSettings) -> float:
        """The furthest a bucket of these settings can run ahead of the clock, in seconds."""
        buckets = [
            b
            for limits in (_limits(settings.pull), _limits(settings.push))
            for b in (limits.identity, limits.address)
            if b is not None
        ]
        return max((b.burst / b.rate for b in buckets), default=1.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = request_kind(scope["method"], scope["path"]) if scope["type"] == "http" else None
        wanted = self._buckets(scope, kind) if kind is not None else []
        if not wanted:
            await self.app(scope, receive, send)
            return
        assert kind is not None
        now = time.monotonic()
        for source, key, _ in wanted:
            until = self._refused.get(key, 0.0)
            if until > now:  # known to be empty: no need to ask the table
                await self._refuse(scope, receive, send, kind, source, until - now)
                return
        waits = await self._take([(key, bucket.rate, bucket.burst) for _, key, bucket in wanted])
        if not any(waits):
            await self.app(scope, receive, send)
            return
        wait, (source, key, _) = max(zip(waits, wanted, strict=True), key=lambda pair: pair[0])
        self._remember(key, now + wait)
        await self._refuse(scope, receive, send, kind, source, wait)

    def _buckets(self, scope: Scope, kind: str) -> list[tuple[str, str, Bucket]]:
        """(source, key, limit) of each bucket this request spends from."""
        limits = self.limits[kind]
        wanted = []
        client = scope.get("client")
        if limits.address is not None and client:
            wanted.append(("address", f"{kind}\0address\0{address_key(client[0])}", limits.address))
        identity = scope.get(IDENTITY)
        if limits.identity is not None and identity:
            wanted.append(("identity", f"{kind}\0identity\0{identity}", limits.identity))
        return wanted

    def _remember(self, key: str, until: float) -> None:
        """A bucket that refused stays empty at least until ``until`` (other workers can
        only spend more of it), so until then this worker refuses without the table: a
        flood from one client costs a dictionary lookup per request."""
        if len(self._refused) >= REFUSED_MEMORY:
            now = time.monotonic()
            self._refused = {k: t for k, t in self._refused.items() if t > now}
            if len(self._refused) >= REFUSED_MEMORY:
                self._refused.clear()
        self._refused[key] = until

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, kind: str, by: str, wait: float
    ) -> None:
        RATE_LIMITED.labels(kind, by).inc()
        headers = {"Retry-After": str(max(math.ceil(wait), 1))}
        if scope["method"] in ("POST", "PUT", "PATCH"):
            headers["Connection"] = "close"  # the refused body is still on the wire
        refused = TooManyRequests(f"too many {kind} requests from this {by}; retry later")
        await error_response(refused, headers)(scope, receive, send)

    async def _take(self, wanted: list[tuple[str, float, int]]) -> list[float]:
        """The table's answer, without ever blocking the event loop on its lock: while
        another worker holds it (for microseconds, unless the OS paused that worker), this
        one yields to its other requests and tries again. A table that stays locked for
        ``LOCK_PATIENCE`` lets the request through uncounted: a stuck worker must not stop
        the others."""
        waits = self.table.take(wanted, block=False)
        deadline = None
        while waits is None:
            now = time.monotonic()
            deadline = deadline or now + LOCK_PATIENCE
            if now > deadline:
                return []
            await asyncio.sleep(0 if deadline - now > LOCK_PATIENCE / 2 else 0.001)
            waits = self.table.take(wanted, block=False)
        return waits
