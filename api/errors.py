"""The one place where registry errors become HTTP: the OCI error JSON and its status.

Statuses are looked up along the exception's class hierarchy, so a subclass (say
``ManifestTooLarge``) may answer differently from its code's usual status.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from cargohold.api.body import drain
from cargohold.engine import errors as e

log = logging.getLogger("cargohold.api")

STATUS: dict[type[e.RegistryError], int] = {
    e.BlobUnknown: 404,
    e.BlobUploadInvalid: 400,
    e.BlobUploadUnknown: 404,
    e.DigestInvalid: 400,
    e.ManifestBlobUnknown: 400,
    e.ManifestInvalid: 400,
    e.ManifestTooLarge: 413,
    e.ManifestUnknown: 404,
    e.NameInvalid: 400,
    e.NameUnknown: 404,
    e.SizeInvalid: 400,
    e.Unsupported: 405,
    e.PaginationInvalid: 400,
    e.EndpointUnknown: 404,
    e.Denied: 403,
    e.TooManyRequests: 429,
    e.RangeInvalid: 416,
    e.StorageUnavailable: 503,
}


def status_for(exc: e.RegistryError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    entry: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}, separators=(",", ":")).encode()


def error_response(exc: e.RegistryError, headers: dict[str, str] | None = None) -> Response:
    status = status_for(exc)
    all_headers = dict(headers or {})
    if isinstance(exc, e.RangeInvalid) and exc.upload_offset is None:
        all_headers["Content-Range"] = f"bytes */{exc.size}"
    if status == 503:
        all_headers.setdefault("Retry-After", "5")
    return Response(
        error_body(exc.code, exc.message, exc.detail),
        status_code=status,
        headers=all_headers,
        media_type="application/json",
    )


def _came_with_a_body(request: Request) -> bool:
    """An error may interrupt a request body mid-way (a 503 from the store, a 416 before
    any byte is read); the rest is then still on the wire, so the connection is closed
    rather than reused. Closing after a body that was read whole costs only a reconnect."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return False
    length = request.headers.get("content-length", "0")
    return length not in ("", "0") or "transfer-encoding" in request.headers


async def registry_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, e.RegistryError)
    headers: dict[str, str] = {}
    if isinstance(exc, e.RangeInvalid) and exc.upload_offset is not None:
        # An out-of-order chunk: tell the client where the upload stands so it can resume.
        headers = {"Location": request.url.path, "Range": f"0-{max(exc.upload_offset - 1, 0)}"}
    if _came_with_a_body(request):
        await drain(request)  # so that the client, done writing, reads this answer
        headers["Connection"] = "close"
    return error_response(exc, headers)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 (paths outside /v2/, wrong methods) in the OCI shape."""
    assert isinstance(exc, HTTPException)
    code = "UNSUPPORTED"
    message = "unknown endpoint" if exc.status_code == 404 else str(exc.detail)
    return Response(
        error_body(code, message),
        status_code=exc.status_code,
        headers=exc.headers,
        media_type="application/json",
    )


async def disconnect_handler(request: Request, exc: Exception) -> Response:
    # The client went away mid-request; nothing was acknowledged, nobody reads this.
    return Response(status_code=400)


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return Response(
        error_body("UNKNOWN", "internal server error"), status_code=500, media_type="application/json"
    )


HANDLERS = {
    e.RegistryError: registry_error_handler,
    HTTPException: http_error_handler,
    ClientDisconnect: disconnect_handler,
    Exception: unexpected_error_handler,
}
