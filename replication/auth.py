"""Registry authentication as an ``httpx.Auth``: Basic, or the Docker bearer-token flow.

A request goes out with the credentials last known to work for its repository. On a
401 the challenge decides: ``Basic`` → retry with the username and password;
``Bearer realm=...,service=...,scope=...`` → fetch a token from the realm (with the
credentials as Basic, or anonymously) and retry with it.

Scopes, as Docker clients do: a token is asked for ``pull,push`` on the request's
repository whatever the challenge named (a HEAD is challenged for ``pull`` only, and the
upload that follows must not need a second round trip; the token server grants only the
permitted subset), plus what the request says it needs besides (a cross-repository mount
needs ``pull`` on the source: ``extensions={"scopes": [...]}``). Tokens are cached per
repository with the scopes they were asked for and their expiry, and refreshed *before*
a request that needs more or after they lapse, because a request with a streamed body
(a chunk of a blob) cannot be sent twice.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass

import httpx

_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
_REPOSITORY = re.compile(r"^/v2/(.+?)/(?:blobs|manifests|tags|referrers)/")
REFRESH_MARGIN_SECONDS = 15.0
SCOPES = "scopes"  # the request extension naming scopes a request needs beyond its repository's


class AuthFailed(Exception):
    """The token realm refused the credentials or answered nonsense."""


@dataclass
class Challenge:
    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


def scope_key(url: httpx.URL) -> str:
    """Tokens are scoped to a repository; the key is the repository the path names."""
    match = _REPOSITORY.match(url.path)
    return match.group(1) if match else ""


def merge_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """``repository:a:pull`` and ``repository:a:push`` make ``repository:a:pull,push``."""
    actions: dict[tuple[str, str], set[str]] = {}
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        name, _, wanted = rest.rpartition(":")
        if not name:
            continue
        actions.setdefault((kind, name), set()).update(a for a in wanted.split(",") if a)
    return frozenset(f"{kind}:{name}:{','.join(sorted(acts))}" for (kind, name), acts in actions.items())


def replayable(request: httpx.Request) -> bool:
    return isinstance(request.stream, httpx.ByteStream)


@dataclass
class _Token:
    value: str
    expires_at: float
    scopes: frozenset[str]


class RegistryAuth(httpx.Auth):
    def __init__(
        self,
        username: str | None,
        password: str | None,
        *,
        verify: bool = True,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._credentials = (username, password or "") if username else None
        self._basic_header = (
            "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode() if username else ""
        )
        self._basic = False  # the registry asked for Basic once: send it up front from then on
        self._realm: Challenge | None = None  # the registry's token realm, once it has named it
        self._tokens: dict[str, _Token] = {}
        self._lock = threading.Lock()
        self._token_http = httpx.Client(verify=verify, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._token_http.close()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        key = scope_key(request.url)
        wanted = merge_scopes(
            [*([f"repository:{key}:pull,push"] if key else []), *request.extensions.get(SCOPES, [])]
        )
        self._authorize(request, key, wanted)
        response = yield request
        if response.status_code != 401:
            return
        challenge = parse_challenge(response.headers.get("www-authenticate", ""))
        if challenge is None:
            return
        if challenge.scheme == "basic" and self._credentials is not None:
            self._basic = True
            request.headers["Authorization"] = self._basic_header
        elif challenge.scheme == "bearer" and "realm" in challenge.params:
            self._realm = challenge
            named = challenge.params.get("scope", "").split()
            token = self._fetch_token(challenge, merge_scopes([*named, *wanted]))
            with self._lock:
                self._tokens[key] = token
            request.headers["Authorization"] = f"Bearer {token.value}"
        else:
            return
        if replayable(request):
            yield request
        # A streamed body is gone: the caller sees the 401 and retries (now with credentials).

    def _authorize(self, request: httpx.Request, key: str, wanted: frozenset[str]) -> None:
        with self._lock:
            token = self._tokens.get(key)
        stale = token is not None and time.time() > token.expires_at - REFRESH_MARGIN_SECONDS
        lacking = token is None or not wanted <= token.scopes
        if self._realm is not None and (stale or lacking):
            # We know where tokens come from: get the right one before sending, not after a 401.
            token = self._fetch_token(self._realm, merge_scopes([*(token.scopes if token else ()), *wanted]))
            with self._lock:
                self._tokens[key] = token
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token.value}"
        elif self._basic:
            request.headers["Authorization"] = self._basic_header

    def _fetch_token(self, challenge: Challenge, scopes: frozenset[str]) -> _Token:
        params: list[tuple[str, str]] = []
        if "service" in challenge.params:
            params.append(("service", challenge.params["service"]))
        params.extend(("scope", scope) for scope in sorted(scopes))
        try:
            response = self._token_http.get(challenge.params["realm"], params=params, auth=self._credentials)
        except httpx.HTTPError as exc:
            raise AuthFailed(f"token realm unreachable: {exc}") from exc
        if response.status_code != 200:
            raise AuthFailed(f"token realm answered {response.status_code}: {response.text[:200]}")
        try:
            body = response.json()
            value = body.get("token") or body.get("access_token")
            expires_in = float(body.get("expires_in") or 60)  # the Docker spec's default
        except (ValueError, AttributeError) as exc:
            raise AuthFailed("token realm answered something that is not a token") from exc
        if not isinstance(value, str) or not value:
            raise AuthFailed("token realm answered without a token")
        return _Token(value, time.time() + expires_in, scopes)
