"""A client for a remote registry's distribution API, on an injected ``httpx`` transport.

Only what replication needs: manifests (HEAD, GET, PUT, DELETE), blobs (HEAD, ranged
GET, cross-repository mount, chunked and resumable uploads), tags and referrers. Every
unexpected answer is a ``RemoteError`` carrying the status and the OCI error code, so
the worker can tell a refusal (never retried) from a passing failure (retried).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from cargohold.engine.digests import digest_bytes, is_digest
from cargohold.replication.auth import SCOPES, RegistryAuth

MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
_RANGE = re.compile(r"^(?:bytes=)?0-([0-9]+)$")
_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
PAGE = 1000
# Answers that retrying cannot change (an immutable tag, a refused type, no permission)...
_REFUSALS = {400, 401, 403, 405, 409, 412, 413, 415, 422}
# ...except these codes: the blobs can be sent again, an upload started over.
_RETRYABLE_CODES = {
    "MANIFEST_BLOB_UNKNOWN",
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "SIZE_INVALID",
    "RANGE_INVALID",
}


class RemoteError(Exception):
    def __init__(self, method: str, url: str, status: int, body: str = "") -> None:
        self.method, self.url, self.status = method, url, status
        self.codes = _error_codes(body)
        detail = f" {','.join(self.codes)}" if self.codes else (f" {body[:200]!r}" if body else "")
        super().__init__(f"{method} {url} answered {status}{detail}")

    @property
    def refused(self) -> bool:
        """The remote registry refused this for good (retrying the same request cannot help)."""
        return self.status in _REFUSALS and not _RETRYABLE_CODES.intersection(self.codes)


def _error_codes(body: str) -> list[str]:
    try:
        errors = json.loads(body).get("errors") or []
        return [str(e.get("code")) for e in errors if isinstance(e, dict) and e.get("code")]
    except (ValueError, AttributeError):
        return []


@dataclass(frozen=True)
class RemoteManifest:
    digest: str
    media_type: str
    data: bytes


@dataclass(frozen=True)
class RemoteBlob:
    size: int | None  # None when the registry sent no Content-Length
    chunks: Iterator[bytes]
    close: Callable[[], None]  # ends the response, whether or not ``chunks`` was read


@dataclass(frozen=True)
class UploadSession:
    location: str
    offset: int  # bytes the registry has acknowledged


@dataclass(frozen=True)
class MountResult:
    mounted: bool
    session: UploadSession | None = None  # a registry that cannot mount may open an upload instead


class RegistryClient:
    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_verify: bool = True,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.auth = RegistryAuth(username, password, verify=tls_verify, timeout=timeout, transport=transport)
        self.http = httpx.Client(
            base_url=self.url,
            auth=self.auth,
            verify=tls_verify,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            headers={"User-Agent": "cargohold-replication"},
        )

    def close(self) -> None:
        self.http.close()
        self.auth.close()

    def _check(self, response: httpx.Response, *expected: int) -> httpx.Response:
        if response.status_code not in expected:
            response.read()
            raise RemoteError(
                response.request.method, str(response.request.url), response.status_code, response.text
            )
        return response

    # -- manifests -------------------------------------------------------------------------
    def manifest_digest(self, repository: str, reference: str) -> str | None:
        response = self.http.head(
            f"/v2/{repository}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT}
        )
        if response.status_code == 404:
            return None
        self._check(response, 200)
        digest = response.headers.get("docker-content-digest")
        if digest is None:  # a registry that does not say: fetch and hash
            manifest = self.manifest(repository, reference)
            return manifest.digest if manifest else None
        return digest

    def manifest(self, repository: str, reference: str) -> RemoteManifest | None:
        response = self.http.get(
            f"/v2/{repository}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT}
        )
        if response.status_code == 404:
            return None
        self._check(response, 200)
        data = response.content
        algorithm = reference.partition(":")[0] if is_digest(reference) else "sha256"
        digest = digest_bytes(data, algorithm)
        if is_digest(reference) and digest != reference:
            raise RemoteError("GET", str(response.request.url), 200, "manifest bytes do not match the digest")
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        return RemoteManifest(digest, media_type or _declared_type(data), data)

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> httpx.Response:
        response = self.http.put(
            f"/v2/{repository}/manifests/{reference}", content=data, headers={"Content-Type": media_type}
        )
        return self._check(response, 201, 200, 204)

    def delete_manifest(self, repository: str, reference: str) -> bool:
        """False if it was not there."""
        response = self.http.delete(f"/v2/{repository}/manifests/{reference}")
        if response.status_code == 404:
            return False
        self._check(response, 202, 200, 204)
        return True

    # -- listings --------------------------------------------------------------------------
    def tags(self, repository: str) -> list[str]:
        found: list[str] = []
        for page in self._pages(f"/v2/{repository}/tags/list", {"n": str(PAGE)}):
            found.extend(page.get("tags") or [])
        return found

    def repositories(self) -> list[str]:
        found: list[str] = []
        for page in self._pages("/v2/_catalog", {"n": str(PAGE)}):
            found.extend(page.get("repositories") or [])
        return found

    def referrers(self, repository: str, digest: str) -> list[dict[str, Any]] | None:
        """Descriptors of the manifests whose subject is ``digest``; None without the API."""
        found: list[dict[str, Any]] = []
        url: str | None = f"/v2/{repository}/referrers/{digest}"
        while url is not None:
            response = self.http.get(url)
            if response.status_code == 404 and not found:
                # A registry with the API answers an OCI error (JSON); one without it, a bare 404
                # (Distribution 2.8: "404 page not found").
                return [] if "json" in response.headers.get("content-type", "") else None
            self._check(response, 200)
            found.extend(response.json().get("manifests") or [])
            url = _next_link(response)
        return found

    def _pages(self, path: str, params: dict[str, str]) -> Iterator[dict[str, Any]]:
        url: str | None = path
        query: dict[str, str] | None = params
        while url is not None:
            response = self.http.get(url, params=query)
            if response.status_code == 404:
                return
            self._check(response, 200)
            yield response.json()
            url, query = _next_link(response), None

    # -- blobs -----------------------------------------------------------------------------
    def has_blob(self, repository: str, digest: str) -> bool:
        return self._head_blob(repository, digest) is not None

    def blob_size(self, repository: str, digest: str) -> int | None:
        """The blob's size as the registry states it, or None if it does not have it."""
        response = self._head_blob(repository, digest)
        if response is None:
            return None
        size = _length(response)
        if size is None:
            raise RemoteError("HEAD", str(response.request.url), 200, "no Content-Length")
        return size

    def _head_blob(self, repository: str, digest: str) -> httpx.Response | None:
        response = self.http.head(f"/v2/{repository}/blobs/{digest}")
        if response.status_code == 404:
            return None
        return self._check(response, 200)

    def open_blob(self, repository: str, digest: str) -> RemoteBlob | None:
        """The whole blob as a stream, with its length if the registry states it; None if
        the registry does not have it. The caller closes ``chunks`` (or reads it to the end)."""
        request = self.http.build_request("GET", f"/v2/{repository}/blobs/{digest}")
        response = self.http.send(request, stream=True, follow_redirects=True)
        if response.status_code == 404:
            response.close()
            return None
        try:
            self._check(response, 200)
        except BaseException:
            response.close()
            raise
        return RemoteBlob(_length(response), _closing(response), response.close)

    def read_blob(
        self, repository: str, digest: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of a blob, streamed (redirects to a store are followed)."""
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        request = self.http.build_request("GET", f"/v2/{repository}/blobs/{digest}", headers=headers)
        response = self.http.send(request, stream=True, follow_redirects=True)
        try:
            self._check(response, 206 if headers else 200, 200)
            if headers and response.status_code == 200:
                raise RemoteError("GET", str(request.url), 200, "the registry ignored the Range header")
        except BaseException:
            response.close()
            raise
        return _closing(response)

    def mount_blob(self, repository: str, digest: str, source: str) -> MountResult:
        response = self.http.post(
            f"/v2/{repository}/blobs/uploads/",
            params={"mount": digest, "from": source},
            headers={"Content-Length": "0"},
            extensions={SCOPES: [f"repository:{source}:pull"]},  # a token must cover the source too
        )
        self._check(response, 201, 202)
        if response.status_code == 201:
            return MountResult(True)
        return MountResult(False, UploadSession(response.headers["location"], 0))

    def start_upload(self, repository: str) -> UploadSession:
        response = self.http.post(f"/v2/{repository}/blobs/uploads/", headers={"Content-Length": "0"})
        self._check(response, 202)
        return UploadSession(response.headers["location"], 0)

    def upload_status(self, location: str) -> UploadSession | None:
        """Where an upload stands, or None if the registry no longer knows it."""
        response = self.http.get(location)
        if response.status_code in (404, 400):
            return None
        self._check(response, 204, 200)
        return UploadSession(response.headers.get("location", location), _acknowledged(response))

    def append(self, session: UploadSession, chunks: Iterable[bytes], length: int) -> UploadSession:
        """PATCH one chunk of exactly ``length`` bytes at the session's offset."""
        end = session.offset + length - 1
        response = self.http.patch(
            session.location,
            content=chunks,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(length),
                "Content-Range": f"{session.offset}-{end}",
            },
        )
        self._check(response, 202, 204)
        acknowledged = _acknowledged(response)
        if acknowledged != end + 1:
            raise RemoteError("PATCH", session.location, response.status_code, f"acknowledged {acknowledged}")
        return UploadSession(response.headers.get("location", session.location), acknowledged)

    def finish(
        self, session: UploadSession, digest: str, chunks: Iterable[bytes] = (), length: int = 0
    ) -> None:
        """The final PUT (with the last bytes, if any); the registry verifies the digest."""
        url = str(httpx.URL(session.location).copy_merge_params({"digest": digest}))
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        if length:
            headers["Content-Range"] = f"{session.offset}-{session.offset + length - 1}"
        response = self.http.put(url, content=chunks if length else b"", headers=headers)
        self._check(response, 201, 204)
        stored = response.headers.get("docker-content-digest")
        if stored is not None and stored != digest:
            raise RemoteError("PUT", url, response.status_code, f"stored as {stored}, not {digest}")

    def cancel(self, session: UploadSession) -> None:
        with contextlib.suppress(httpx.HTTPError):  # it expires on its own anyway
            self.http.delete(session.location)


def _closing(response: httpx.Response) -> Iterator[bytes]:
    try:
        yield from response.iter_bytes(1 << 20)
    finally:
        response.close()


def _length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def _acknowledged(response: httpx.Response) -> int:
    """Bytes received so far, from ``Range: 0-<last>`` (``0-0`` before the first byte is ambiguous:
    taken as 0, since chunks are never a single byte)."""
    match = _RANGE.match(response.headers.get("range", "").strip())
    if match is None:
        return 0
    last = int(match.group(1))
    return 0 if last == 0 else last + 1


def _next_link(response: httpx.Response) -> str | None:
    match = _NEXT.search(response.headers.get("link", ""))
    return match.group(1) if match else None


def _declared_type(data: bytes) -> str:
    try:
        value = json.loads(data).get("mediaType")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""
