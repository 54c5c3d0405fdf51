"""Request helpers for the HTTP conformance tests: push blobs and images, build manifests,
check OCI error bodies.

Everything here speaks plain HTTP through an ``httpx.Client`` whose ``base_url`` is the
registry under test, so a test reads as the requests a real client would send.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

# Developer mode: the session server is CNCF Distribution 2.8.2 (see tests/conftest.py).
ON_DISTRIBUTION = os.environ.get("CARGOHOLD_TEST_TARGET", "cargohold") == "distribution"


def distribution_deviates(why: str) -> pytest.MarkDecorator:
    """Skip in developer mode where CNCF Distribution 2.8 is known to differ from the spec."""
    return pytest.mark.skipif(ON_DISTRIBUTION, reason=f"Distribution 2.8 deviates: {why}")


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ALL_MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)

EMPTY_CONFIG = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

# The error codes of the OCI distribution-spec (v1.1.1 and main), plus the legacy codes
# the spec says a client MAY meet and the ones CNCF Distribution registers for ranges
# and pagination (the spec has no code of its own for those conditions).
SPEC_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
    }
)
EXTRA_CODES = frozenset({"TAG_INVALID", "RANGE_INVALID", "PAGINATION_NUMBER_INVALID", "UNKNOWN"})
KNOWN_CODES = SPEC_CODES | EXTRA_CODES
_CODE_RE = re.compile(r"^[A-Z_]+$")
_LINK_NEXT_RE = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha512(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


def unique_repo(prefix: str = "t") -> str:
    """A repository name no other test uses (the session server is shared)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def with_query(url: str, params: Sequence[tuple[str, str]] | Mapping[str, str]) -> str:
    """Add query parameters to a Location without losing the ones it already carries."""
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    return str(httpx.URL(url).copy_merge_params(items))


def error_codes(resp: httpx.Response) -> list[str]:
    """The ``code`` of every error in an OCI error body; fails if the body is not one."""
    try:
        body = resp.json()
    except ValueError:
        pytest.fail(
            f"{resp.request.method} {resp.request.url} -> {resp.status_code}: not JSON: {resp.text!r}"
        )
    assert isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"], (
        f"not an OCI error body: {body!r}"
    )
    codes = []
    for err in body["errors"]:
        assert isinstance(err, dict), f"error entry is not an object: {err!r}"
        code = err.get("code")
        assert isinstance(code, str) and _CODE_RE.match(code), f"bad error code {code!r} in {body!r}"
        if "message" in err:
            assert isinstance(err["message"], str), f"message is not a string: {err!r}"
        codes.append(code)
    return codes


def assert_error(resp: httpx.Response, status: int | Sequence[int], codes: str | Sequence[str]) -> str:
    """Assert an OCI error response: the status (one of) and a code (one of). Returns the code."""
    statuses = (status,) if isinstance(status, int) else tuple(status)
    wanted = (codes,) if isinstance(codes, str) else tuple(codes)
    where = f"{resp.request.method} {resp.request.url}"
    assert resp.status_code in statuses, (
        f"{where}: expected {statuses}, got {resp.status_code}: {resp.text[:500]!r}"
    )
    found = error_codes(resp)
    assert any(code in wanted for code in found), (
        f"{resp.request.method} {resp.request.url}: expected code in {wanted}, got {found}"
    )
    return next(code for code in found if code in wanted)


def next_link(resp: httpx.Response) -> str | None:
    """The target of a ``Link: <...>; rel="next"`` header, or None."""
    header = resp.headers.get("link")
    if not header:
        return None
    match = _LINK_NEXT_RE.search(header)
    assert match, f"Link header without rel=next: {header!r}"
    return match.group(1)


# --- blobs -----------------------------------------------------------------------------


def start_upload(client: httpx.Client, repo: str, **params: str) -> httpx.Response:
    resp = client.post(f"/v2/{repo}/blobs/uploads/", params=params, headers={"Content-Length": "0"})
    assert resp.status_code == 202, f"POST upload: {resp.status_code} {resp.text}"
    assert resp.headers.get("location"), "POST upload without Location"
    return resp


def push_blob(client: httpx.Client, repo: str, data: bytes, digest: str | None = None) -> str:
    """Monolithic POST + PUT of one blob; returns its digest."""
    digest = digest or sha256(data)
    location = start_upload(client, repo).headers["location"]
    resp = client.put(
        with_query(location, {"digest": digest}),
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 201, f"PUT blob {digest} into {repo}: {resp.status_code} {resp.text}"
    return digest


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


# --- manifests -------------------------------------------------------------------------


def encode(doc: Mapping[str, Any]) -> bytes:
    """Serialize a manifest in a deliberately unusual layout (indentation, key order,
    trailing newline) so that any re-serialization by the registry changes the bytes."""
    return (json.dumps(doc, indent=3, separators=(",", " :  ")) + "\n").encode()


def image_manifest(
    config: Mapping[str, Any],
    layers: Sequence[Mapping[str, Any]],
    *,
    media_type: str = OCI_MANIFEST,
    artifact_type: str | None = None,
    subject: Mapping[str, Any] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type}
    if artifact_type:
        doc["artifactType"] = artifact_type
    doc["config"] = dict(config)
    doc["layers"] = [dict(layer) for layer in layers]
    if subject:
        doc["subject"] = dict(subject)
    if annotations:
        doc["annotations"] = dict(annotations)
    return doc


def index_manifest(
    manifests: Sequence[Mapping[str, Any]],
    *,
    media_type: str = OCI_INDEX,
    artifact_type: str | None = None,
    subject: Mapping[str, Any] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type}
    if artifact_type:
        doc["artifactType"] = artifact_type
    doc["manifests"] = [dict(m) for m in manifests]
    if subject:
        doc["subject"] = dict(subject)
    if annotations:
        doc["annotations"] = dict(annotations)
    return doc


def put_manifest(
    client: httpx.Client,
    repo: str,
    reference: str,
    body: bytes,
    media_type: str,
    params: Sequence[tuple[str, str]] = (),
) -> httpx.Response:
    return client.put(
        f"/v2/{repo}/manifests/{reference}",
        content=body,
        headers={"Content-Type": media_type},
        params=list(params),
    )


def push_manifest(client: httpx.Client, repo: str, reference: str, body: bytes, media_type: str) -> str:
    """PUT a manifest that must be accepted; returns its digest."""
    resp = put_manifest(client, repo, reference, body, media_type)
    assert resp.status_code == 201, f"PUT manifest {repo}:{reference}: {resp.status_code} {resp.text}"
    return sha256(body)


@dataclass
class Image:
    """An image pushed to a repository: its blobs and the exact manifest bytes."""

    repo: str
    manifest: bytes
    media_type: str
    blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return descriptor(self.media_type, self.manifest, **extra)


def push_image(
    client: httpx.Client,
    repo: str,
    reference: str | None = "latest",
    *,
    layer_count: int = 1,
    docker: bool = False,
    artifact_type: str | None = None,
    subject: Mapping[str, Any] | None = None,
    annotations: Mapping[str, str] | None = None,
    config_media_type: str | None = None,
) -> Image:
    """Push a small random image (config + layers + manifest). ``reference=None`` pushes the
    manifest by digest. ``artifact_type`` makes an OCI artifact with the empty config."""
    blobs: dict[str, bytes] = {}
    if artifact_type and not config_media_type:
        config_bytes, config_type = EMPTY_CONFIG, OCI_EMPTY
    else:
        config_bytes = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": []},
                "nonce": uuid.uuid4().hex,
            }
        ).encode()
        config_type = config_media_type or (DOCKER_CONFIG if docker else OCI_CONFIG)
    layer_type = DOCKER_LAYER if docker else (artifact_type or OCI_LAYER)
    blobs[push_blob(client, repo, config_bytes)] = config_bytes
    layers = []
    for _ in range(layer_count):
        data = random_bytes(64)
        blobs[push_blob(client, repo, data)] = data
        layers.append(descriptor(layer_type, data))
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    body = encode(
        image_manifest(
            descriptor(config_type, config_bytes),
            layers,
            media_type=media_type,
            artifact_type=artifact_type,
            subject=subject,
            annotations=annotations,
        )
    )
    push_manifest(client, repo, reference or sha256(body), body, media_type)
    return Image(repo=repo, manifest=body, media_type=media_type, blobs=blobs)


def push_index(
    client: httpx.Client,
    repo: str,
    reference: str | None,
    children: Sequence[Image],
    *,
    docker: bool = False,
) -> Image:
    platforms = [{"architecture": arch, "os": "linux"} for arch in ("amd64", "arm64", "riscv64", "s390x")]
    media_type = DOCKER_LIST if docker else OCI_INDEX
    body = encode(
        index_manifest(
            [child.descriptor(platform=platforms[i % len(platforms)]) for i, child in enumerate(children)],
            media_type=media_type,
        )
    )
    push_manifest(client, repo, reference or sha256(body), body, media_type)
    return Image(repo=repo, manifest=body, media_type=media_type)


# --- raw requests ----------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    base_url: str,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
) -> RawResponse:
    """Send a request with the path exactly as given (httpx would normalize ``..`` and
    friends away, which is what a hostile client would not do)."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        all_headers = {"Content-Length": str(len(body)), **(headers or {})}
        for key, value in all_headers.items():
            conn.putheader(key, value)
        conn.endheaders(body or None)
        resp = conn.getresponse()
        data = resp.read()
        return RawResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()
