"""What every admin endpoint shares: who may call it, its error shape, its bounded JSON body."""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from cargohold.api.body import read_limited

MAX_BODY = 1024 * 1024  # admin requests are a few policies or an identity: a few KB


class AdminRequestInvalid(Exception):
    """A malformed admin request (400)."""


def admin_error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="cargohold-admin"'} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def admin_authorized(request: Request, token: bytes) -> bool:
    """An identity with the admin role (marked by api/auth.py), or the break-glass token."""
    if request.scope.get("cargohold.admin"):
        return True
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return (
        bool(token)  # no token configured: the break-glass is off, never an empty match
        and scheme.lower() == "bearer"
        and hmac.compare_digest(credentials.strip().encode(), token)
    )


async def json_object_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object ({} if empty); ``AdminRequestInvalid`` otherwise, and for a
    body over ``MAX_BODY``, which is never read whole."""
    body = await read_limited(request, MAX_BODY)
    if body is None:
        raise AdminRequestInvalid(f"the request body is larger than {MAX_BODY} bytes")
    if not body:
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        raise AdminRequestInvalid("the request body must be a JSON object") from None
    if not isinstance(value, dict):
        raise AdminRequestInvalid("the request body must be a JSON object")
    return value
