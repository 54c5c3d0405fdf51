"""The OCI Distribution API v1.1 endpoints under ``/v2/``.

Each handler parses the request, makes one engine call and shapes the response.
Names may contain slashes, so ``/v2/<rest>`` is matched against anchored patterns
from the right (``<name>/blobs/uploads/<id>`` before ``<name>/blobs/<digest>``).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from cargohold.api.body import BodyPump, read_limited
from cargohold.api.cursors import SEALED
from cargohold.api.ranges import parse_content_range, parse_length, parse_range
from cargohold.engine import Registry
from cargohold.engine.errors import (
    DigestInvalid,
    EndpointUnknown,
    ManifestTooLarge,
    ManifestUnknown,
    PaginationInvalid,
    Unsupported,
)
from cargohold.engine.manifests import OCI_INDEX
from cargohold.engine.pullthrough import PullThrough

_DIGITS = re.compile(r"[0-9]{1,9}")
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
JSON = "application/json"
Handler = Callable[[Request, "DistributionAPI", dict[str, str]], Awaitable[Response]]


def _upload_headers(name: str, upload_id: str, size: int) -> dict[str, str]:
    return {
        "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
        "Range": f"0-{max(size - 1, 0)}",
        "Docker-Upload-UUID": upload_id,
        "Content-Length": "0",
    }


def _page_size(request: Request, cap: int) -> tuple[int, bool]:
    """``n`` capped at ``cap`` (the cap also applies when n is absent), and whether n was given."""
    raw = request.query_params.get("n")
    if raw is None or raw == "":
        return cap, False
    if not _DIGITS.fullmatch(raw):
        raise PaginationInvalid("n must be a non-negative integer", detail={"n": raw[:20]})
    return min(int(raw), cap), True


def _last(request: Request) -> str | None:
    last = request.query_params.get("last")
    if last is not None and len(last) > 512:
        raise PaginationInvalid("last is too long")
    return last


def _next_link(path: str, params: dict[str, Any]) -> str:
    return f'<{path}?{urlencode(params)}>; rel="next"'


class DistributionAPI:
    """The /v2/ handlers, bound to one engine and the settings that shape answers."""

    def __init__(
        self,
        registry: Registry,
        *,
        catalog_max_n: int,
        tags_max_n: int,
        catalog_scan_budget: int = 20_000,
        referrers_page_size: int,
        chunk_min_length: int,
        cache: PullThrough | None = None,
    ) -> None:
        self.registry = registry
        self.cache = cache  # pull-through cache namespaces: reads go through it, pushes are refused
        self.catalog_max_n = catalog_max_n
        self.catalog_scan_budget = catalog_scan_budget
        self.tags_max_n = tags_max_n
        self.referrers_page_size = referrers_page_size
        self.chunk_min_length = chunk_min_length

    # ------------------------------------------------------------------- dispatch
    async def base(self, request: Request) -> Response:
        return Response(b"{}", media_type=JSON, headers=API_VERSION)

    async def dispatch(self, request: Request) -> Response:
        rest = request.path_params["rest"]
        for pattern, handlers in _ROUTES:
            match = pattern.fullmatch(rest)
            if match is None:
                continue
            handler = handlers.get(request.method)
            if handler is None:
                raise Unsupported(f"method {request.method} is not allowed here")
            return await handler(self, request, match.groupdict())
        raise EndpointUnknown(detail={"path": request.url.path[:300]})

    # ---------------------------------------------------------- pull-through cache
    def _cache_for(self, name: str) -> PullThrough | None:
        return self.cache if self.cache is not None and self.cache.covers(name) else None

    def _refuse_push(self, name: str) -> None:
        if self._cache_for(name) is not None:
            raise Unsupported(
                "this repository is a pull-through cache of an upstream registry: push there",
                detail={"name": name},
            )

    # ---------------------------------------------------------------------- blobs
    async def head_blob(self, request: Request, p: dict[str, str]) -> Response:
        cache = self._cache_for(p["name"])
        if cache is not None:
            info = await run_in_threadpool(cache.stat_blob, p["name"], p["digest"])
        else:
            info = self.registry.stat_blob(p["name"], p["digest"])
        return Response(
            headers={
                "Content-Length": str(info.size),
                "Docker-Content-Digest": info.digest,
                "Accept-Ranges": "bytes",
                "ETag": f'"{info.digest}"',
            },
            media_type="application/octet-stream",
        )

    async def get_blob(self, request: Request, p: dict[str, str]) -> Response:
        reads = self._cache_for(p["name"]) or self.registry
        reader = await run_in_threadpool(reads.open_blob, p["name"], p["digest"])
        headers = {
            "Docker-Content-Digest": reader.digest,
            "Accept-Ranges": "bytes",
            "ETag": f'"{reader.digest}"',
            "Cache-Control": "max-age=31536000, immutable",
        }
        if reader.redirect_url is not None:
            return Response(status_code=307, headers={**headers, "Location": reader.redirect_url})
        byte_range = parse_range(request.headers.get("range"), reader.size)
        if byte_range is None:
            if reader.local_path is not None:
                return _LocalFileResponse(reader.local_path, headers, reader.size)
            headers["Content-Length"] = str(reader.size)
            body = await run_in_threadpool(reader.read)
            return StreamingResponse(body, headers=headers, media_type="application/octet-stream")
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{reader.size}"
        headers["Content-Length"] = str(end - start)
        body = await run_in_threadpool(reader.read, start, end)
        return StreamingResponse(
            body, status_code=206, headers=headers, media_type="application/octet-stream"
        )

    async def delete_blob(self, request: Request, p: dict[str, str]) -> Response:
        await run_in_threadpool(self.registry.delete_blob, p["name"], p["digest"])
        return Response(status_code=202, headers={"Content-Length": "0"})

    # -------------------------------------------------------------------- uploads
    async def start_upload(self, request: Request, p: dict[str, str]) -> Response:
        name, query = p["name"], request.query_params
        self._refuse_push(name)
        mount = query.get("mount")
        if mount is not None:
            # With access control on, only from repositories the caller may pull (api/auth.py).
            may_read = request.scope.get("cargohold.may_pull", _anyone)
            mounted = await run_in_threadpool(
                self.registry.mount_blob, name, mount, query.get("from"), may_read
            )
            if mounted is not None:
                return self._blob_created(name, mounted.digest)
        digest = query.get("digest")
        algorithm = query.get("digest-algorithm", "sha256")
        if digest is not None:
            return await self._monolithic(request, name, digest)
        state = await run_in_threadpool(self.registry.start_upload, name, algorithm)
        headers = _upload_headers(name, state.id, 0)
        if self.chunk_min_length:
            headers["OCI-Chunk-Min-Length"] = str(self.chunk_min_length)
        return Response(status_code=202, headers=headers)

    async def _monolithic(self, request: Request, name: str, digest: str) -> Response:
        length = parse_length(request.headers.get("content-length"))
        algorithm = digest.partition(":")[0]
        state = await run_in_threadpool(self.registry.start_upload, name, algorithm)
        try:
            async with BodyPump(request) as pump:
                info = await run_in_threadpool(
                    lambda: self.registry.finish_upload(name, state.id, digest, pump.pieces(), length=length)
                )
        except BaseException:
            await run_in_threadpool(_quietly, self.registry.cancel_upload, name, state.id)
            raise
        return self._blob_created(name, info.digest)

    async def upload_status(self, request: Request, p: dict[str, str]) -> Response:
        state = self.registry.upload_status(p["name"], p["id"])
        return Response(status_code=204, headers=_upload_headers(p["name"], state.id, state.size))

    async def patch_upload(self, request: Request, p: dict[str, str]) -> Response:
        name, upload_id = p["name"], p["id"]
        start, length = _chunk(request)
        async with BodyPump(request) as pump:
            state = await run_in_threadpool(
                lambda: self.registry.append_upload(
                    name, upload_id, pump.pieces(), start=start, length=length
                )
            )
        return Response(status_code=202, headers=_upload_headers(name, state.id, state.size))

    async def finish_upload(self, request: Request, p: dict[str, str]) -> Response:
        name, upload_id = p["name"], p["id"]
        digest = request.query_params.get("digest")
        if not digest:
            raise DigestInvalid("the digest query parameter is required to complete an upload")
        start, length = _chunk(request)
        async with BodyPump(request) as pump:
            info = await run_in_threadpool(
                lambda: self.registry.finish_upload(
                    name, upload_id, digest, pump.pieces(), start=start, length=length
                )
            )
        return self._blob_created(name, info.digest)

    async def cancel_upload(self, request: Request, p: dict[str, str]) -> Response:
        await run_in_threadpool(self.registry.cancel_upload, p["name"], p["id"])
        return Response(status_code=204, headers={"Content-Length": "0"})

    @staticmethod
    def _blob_created(name: str, digest: str) -> Response:
        return Response(
            status_code=201,
            headers={
                "Location": f"/v2/{name}/blobs/{digest}",
                "Docker-Content-Digest": digest,
                "Content-Length": "0",
            },
        )

    # ------------------------------------------------------------------ manifests
    async def get_manifest(self, request: Request, p: dict[str, str]) -> Response:
        with_data = request.method == "GET"
        reference = p["reference"]
        cache = self._cache_for(p["name"])
        if cache is not None:
            manifest = await run_in_threadpool(cache.get_manifest, p["name"], reference, with_data)
        else:
            manifest = self.registry.get_manifest(p["name"], reference, with_data=with_data)
        accept = ",".join(request.headers.getlist("accept"))
        if ":" not in reference and not _accepts(accept, manifest.media_type):
            # As Distribution does: a tag whose manifest the client cannot parse is "not
            # there" for it; by digest the client asked for exactly these bytes.
            raise ManifestUnknown(
                f"manifest is {manifest.media_type}, which the Accept header does not list",
                detail={"reference": reference},
            )
        headers = {
            "Docker-Content-Digest": manifest.digest,
            "ETag": f'"{manifest.digest}"',
            "Content-Length": str(manifest.size),
        }
        return Response(manifest.data if with_data else b"", headers=headers, media_type=manifest.media_type)

    async def put_manifest(self, request: Request, p: dict[str, str]) -> Response:
        self._refuse_push(p["name"])
        limit = self.registry.limits.manifest_max_bytes
        length = parse_length(request.headers.get("content-length"))
        if length is not None and length > limit:
            raise ManifestTooLarge(detail={"size": length, "limit": limit})
        data = await read_limited(request, limit)
        if data is None:
            raise ManifestTooLarge(detail={"limit": limit})
        tags = request.query_params.getlist("tag")
        result = await run_in_threadpool(
            self.registry.put_manifest,
            p["name"],
            p["reference"],
            data,
            request.headers.get("content-type"),
            tags,
        )
        headers = [
            ("Location", f"/v2/{p['name']}/manifests/{result.digest}"),
            ("Docker-Content-Digest", result.digest),
            ("Content-Length", "0"),
        ]
        if result.subject:
            headers.append(("OCI-Subject", result.subject))
        if tags:
            headers.extend(("OCI-Tag", tag) for tag in result.tags)
        response = Response(status_code=201)
        response.raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers]
        return response

    async def delete_manifest(self, request: Request, p: dict[str, str]) -> Response:
        await run_in_threadpool(self.registry.delete_manifest, p["name"], p["reference"])
        return Response(status_code=202, headers={"Content-Length": "0"})

    # ------------------------------------------------------------------ discovery
    async def list_tags(self, request: Request, p: dict[str, str]) -> Response:
        name = p["name"]
        (n, _), last = _page_size(request, self.tags_max_n), _last(request)
        page = await run_in_threadpool(self.registry.list_tags, name, n, last)
        headers = {}
        if page.more and page.items:
            headers["Link"] = _next_link(f"/v2/{name}/tags/list", {"n": n, "last": page.items[-1]})
        body = json.dumps({"name": name, "tags": page.items}, separators=(",", ":"))
        return Response(body, media_type=JSON, headers=headers)

    async def catalog(self, request: Request) -> Response:
        (n, _), last = _page_size(request, self.catalog_max_n), _last(request)
        # Both set by api/auth.py when access control is on (see api/cursors.py).
        visible, seal = request.scope.get("cargohold.may_pull"), request.scope.get("cargohold.cursor_seal")
        if last is not None and last.startswith(SEALED):
            if seal is None:
                raise PaginationInvalid("last is not a cursor this registry gave")
            last = seal.open(last)
        page = await run_in_threadpool(
            self.registry.list_repositories, n, last, visible, self.catalog_scan_budget
        )
        headers = {}
        if page.resume_after is not None and seal is not None:
            headers["Link"] = _next_link("/v2/_catalog", {"n": n, "last": seal.seal(page.resume_after)})
        elif page.more and page.items:
            headers["Link"] = _next_link("/v2/_catalog", {"n": n, "last": page.items[-1]})
        body = json.dumps({"repositories": page.items}, separators=(",", ":"))
        return Response(body, media_type=JSON, headers=headers)

    async def referrers(self, request: Request, p: dict[str, str]) -> Response:
        name, digest = p["name"], p["digest"]
        artifact_type = request.query_params.get("artifactType") or None
        last = _last(request)
        if self.cache is not None and self.cache.covers(name):
            await run_in_threadpool(self.cache.refresh_referrers, name, digest)
        page = await run_in_threadpool(
            self.registry.referrers, name, digest, artifact_type, last, self.referrers_page_size
        )
        headers = {}
        if artifact_type is not None:
            headers["OCI-Filters-Applied"] = "artifactType"
        if page.more:
            params = {"last": page.items[-1]["digest"]}
            if artifact_type is not None:
                params["artifactType"] = artifact_type
            headers["Link"] = _next_link(f"/v2/{name}/referrers/{quote(digest)}", params)
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": page.items}
        return Response(json.dumps(body, separators=(",", ":")), media_type=OCI_INDEX, headers=headers)


def _chunk(request: Request) -> tuple[int | None, int | None]:
    """Where a chunk claims to start and how long it is (Content-Range wins over Content-Length).

    The engine checks the start first (416 when out of order) and then that exactly
    ``length`` bytes arrived, so a Content-Length that disagrees with Content-Range
    ends as SIZE_INVALID with nothing acknowledged.
    """
    length = parse_length(request.headers.get("content-length"))
    chunk = parse_content_range(request.headers.get("content-range"), 0)
    if chunk is None:
        return None, length
    return chunk


def _accepts(accept: str | None, media_type: str) -> bool:
    if not accept:
        return True
    for item in accept.split(","):
        kind = item.split(";", 1)[0].strip().lower()
        if kind in (media_type, "*/*", "application/*", "application/json") or not kind:
            return True
    return False


def _anyone(name: str) -> bool:
    return True


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(Exception):
        fn(*args)


class _LocalFileResponse(FileResponse):
    """A whole blob from a local file, sent with sendfile where the server supports pathsend.

    Range requests are answered by the API itself (with OCI errors), so the Range
    header is hidden from FileResponse's own range handling.
    """

    def __init__(self, path: Any, headers: dict[str, str], size: int) -> None:
        super().__init__(path, headers=headers, media_type="application/octet-stream")
        self._size = size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope.get("headers", []) if k not in (b"range", b"if-range")]
        await super().__call__({**scope, "headers": headers}, receive, send)


_NAME = r"(?P<name>.+)"
_ROUTES: list[tuple[re.Pattern[str], dict[str, Callable[..., Awaitable[Response]]]]] = [
    (
        re.compile(_NAME + r"/blobs/uploads/?"),
        {"POST": DistributionAPI.start_upload},
    ),
    (
        re.compile(_NAME + r"/blobs/uploads/(?P<id>[^/]+)"),
        {
            "GET": DistributionAPI.upload_status,
            "PATCH": DistributionAPI.patch_upload,
            "PUT": DistributionAPI.finish_upload,
            "DELETE": DistributionAPI.cancel_upload,
        },
    ),
    (
        re.compile(_NAME + r"/blobs/(?P<digest>[^/]+)"),
        {
            "GET": DistributionAPI.get_blob,
            "HEAD": DistributionAPI.head_blob,
            "DELETE": DistributionAPI.delete_blob,
        },
    ),
    (
        re.compile(_NAME + r"/manifests/(?P<reference>[^/]+)"),
        {
            "GET": DistributionAPI.get_manifest,
            "HEAD": DistributionAPI.get_manifest,
            "PUT": DistributionAPI.put_manifest,
            "DELETE": DistributionAPI.delete_manifest,
        },
    ),
    (re.compile(_NAME + r"/tags/list"), {"GET": DistributionAPI.list_tags}),
    (re.compile(_NAME + r"/referrers/(?P<digest>[^/]+)"), {"GET": DistributionAPI.referrers}),
]
