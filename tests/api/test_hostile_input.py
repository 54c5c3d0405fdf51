"""Hostile and malformed requests: never a 5xx, always an OCI error body, never an escape.

Paths are sent byte for byte (``raw_request``), so ``..`` and percent-encodings reach the
server as a hostile client would send them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import pytest

from tests.api.oci import (
    KNOWN_CODES,
    OCI_MANIFEST,
    RawResponse,
    distribution_deviates,
    next_link,
    push_image,
    raw_request,
    sha256,
    start_upload,
    unique_repo,
)
from tests.support.servers import RegistryProcess

ANY_4XX = tuple(range(400, 500))
NAME_CODES = ("NAME_INVALID", "NAME_UNKNOWN")
DIGEST_CODES = ("DIGEST_INVALID",)
TAG_CODES = ("TAG_INVALID", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID")
# A percent-encoded "/" or ".." may decode into a path that no endpoint matches: a 404 with
# UNSUPPORTED ("the operation is unsupported") is a fair answer there, as long as it is not 2xx.
UNROUTABLE = ("UNSUPPORTED",)
RANGE_CODES = ("RANGE_INVALID", "BLOB_UPLOAD_INVALID", "SIZE_INVALID")
PAGE_CODES = ("PAGINATION_NUMBER_INVALID", "UNSUPPORTED")
HEX64 = "a" * 64
VALID_NAME = re.compile(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*")


@dataclass(frozen=True)
class Case:
    """One hostile request. ``statuses``: what is acceptable (success included where the
    input is merely unusual); ``codes``: acceptable error codes (any known code if empty)."""

    method: str
    path: str
    statuses: tuple[int, ...] = ANY_4XX
    codes: tuple[str, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def case(case_id: str, *args: object, deviates: str | None = None, **kwargs: object) -> object:
    marks = [distribution_deviates(deviates)] if deviates else []
    return pytest.param(Case(*args, **kwargs), id=case_id, marks=marks)  # type: ignore[arg-type]


TEXT_404 = "an unroutable path gets a text/plain 404, not an OCI error"
LONG_500 = "a name over 255 characters is a 500 UNKNOWN"
NO_CHECK = "2.8 does not validate this parameter"

CASES = [
    # --- repository names ---------------------------------------------------------------
    case("name-uppercase", "GET", "/v2/UPPER/tags/list", (400, 404), NAME_CODES, deviates=TEXT_404),
    case("name-dotdot", "GET", "/v2/{repo}/../etc/tags/list", (400, 404), NAME_CODES, deviates=TEXT_404),
    case(
        "name-dotdot-encoded",
        "GET",
        "/v2/{repo}/%2e%2e/%2e%2e/etc/tags/list",
        (400, 404),
        NAME_CODES,
        deviates=TEXT_404,
    ),
    case(
        "name-dotdot-slash-encoded",
        "GET",
        "/v2/..%2f..%2fetc%2fpasswd/tags/list",
        (400, 404),
        NAME_CODES,
        deviates=TEXT_404,
    ),
    case(
        "name-leading-slash",
        "GET",
        "//v2/{repo}/tags/list",
        (400, 404),
        (*NAME_CODES, *UNROUTABLE),
        deviates=TEXT_404,
    ),
    case(
        "name-empty-first-component",
        "GET",
        "/v2//{repo}/tags/list",
        (400, 404),
        NAME_CODES,
        deviates=TEXT_404,
    ),
    case("name-empty-component", "GET", "/v2/a//b/tags/list", (400, 404), NAME_CODES, deviates=TEXT_404),
    case(
        "name-too-long", "GET", "/v2/" + "a" * 256 + "/tags/list", (400, 404), NAME_CODES, deviates=LONG_500
    ),
    case(
        "name-too-long-nested",
        "GET",
        "/v2/" + "/".join(["abcdefghij"] * 24) + "/tags/list",
        (400, 404),
        NAME_CODES,
        deviates=LONG_500,
    ),
    case("name-trailing-separator", "GET", "/v2/a-/tags/list", (400, 404), NAME_CODES, deviates=TEXT_404),
    case("name-leading-separator", "GET", "/v2/-a/tags/list", (400, 404), NAME_CODES, deviates=TEXT_404),
    case("name-double-dot", "GET", "/v2/a..b/tags/list", (400, 404), NAME_CODES, deviates=TEXT_404),
    case("name-nul", "GET", "/v2/a%00b/tags/list", (400, 404), NAME_CODES, deviates=TEXT_404),
    case("name-space", "GET", "/v2/a%20b/tags/list", (400, 404), NAME_CODES, deviates=TEXT_404),
    case("name-unicode", "GET", "/v2/%C3%A9t%C3%A9/tags/list", (400, 404), NAME_CODES, deviates=TEXT_404),
    case("name-invalid-push", "POST", "/v2/UPPER/blobs/uploads/", (400, 404), NAME_CODES, deviates=TEXT_404),
    case(
        "name-too-long-push",
        "POST",
        "/v2/" + "b" * 256 + "/blobs/uploads/",
        (400, 404),
        NAME_CODES,
        deviates=LONG_500,
    ),
    case(
        "name-invalid-manifest-put",
        "PUT",
        "/v2/a..b/manifests/v1",
        (400, 404),
        NAME_CODES,
        headers={"Content-Type": OCI_MANIFEST},
        body=b"{}",
        deviates=TEXT_404,
    ),
    case(
        "name-traversal-blob",
        "GET",
        "/v2/{repo}/../../../etc/blobs/" + sha256(b"x"),
        (400, 404),
        (*NAME_CODES, "BLOB_UNKNOWN"),
        deviates=TEXT_404,
    ),
    # --- digests ------------------------------------------------------------------------
    case(
        "digest-not-a-digest", "GET", "/v2/{repo}/blobs/notadigest", (400,), DIGEST_CODES, deviates=TEXT_404
    ),
    case("digest-short", "GET", "/v2/{repo}/blobs/sha256:abc", (400,), DIGEST_CODES),
    case("digest-not-hex", "GET", "/v2/{repo}/blobs/sha256:" + "z" * 64, (400,), DIGEST_CODES),
    case("digest-uppercase-hex", "GET", "/v2/{repo}/blobs/sha256:" + "A" * 64, (400,), DIGEST_CODES),
    case("digest-sha512-wrong-length", "GET", "/v2/{repo}/blobs/sha512:" + HEX64, (400,), DIGEST_CODES),
    case(
        "digest-unknown-algorithm",
        "GET",
        "/v2/{repo}/blobs/md5:" + "a" * 32,
        (400, 404),
        (*DIGEST_CODES, "BLOB_UNKNOWN", "UNSUPPORTED"),
    ),
    case("digest-empty-hex", "GET", "/v2/{repo}/blobs/sha256:", (400, 404), DIGEST_CODES, deviates=TEXT_404),
    case(
        "digest-traversal",
        "GET",
        "/v2/{repo}/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd",
        (400, 404),
        (*DIGEST_CODES, *UNROUTABLE),
        deviates=TEXT_404,
    ),
    case("digest-delete-short", "DELETE", "/v2/{repo}/blobs/sha256:abc", (400,), DIGEST_CODES),
    case(
        "digest-referrers",
        "GET",
        "/v2/{repo}/referrers/notadigest",
        (400,),
        DIGEST_CODES,
        deviates="no referrers API",
    ),
    case(
        "digest-manifest-short",
        "GET",
        "/v2/{repo}/manifests/sha256:abc",
        (400, 404),
        (*DIGEST_CODES, "MANIFEST_UNKNOWN"),
        deviates="a malformed digest reference is looked up as a tag: 500",
    ),
    # --- tags ---------------------------------------------------------------------------
    case("tag-leading-dash", "GET", "/v2/{repo}/manifests/-bad", (400, 404), TAG_CODES, deviates=TEXT_404),
    case(
        "tag-too-long", "GET", "/v2/{repo}/manifests/" + "t" * 129, (400, 404), TAG_CODES, deviates=TEXT_404
    ),
    case(
        "tag-encoded-slash",
        "GET",
        "/v2/{repo}/manifests/a%2Fb",
        (400, 404),
        (*TAG_CODES, *UNROUTABLE),
        deviates=TEXT_404,
    ),
    case(
        "tag-put-leading-dash",
        "PUT",
        "/v2/{repo}/manifests/-bad",
        (400,),
        TAG_CODES,
        headers={"Content-Type": OCI_MANIFEST},
        body=b"{manifest}",
        deviates=TEXT_404,
    ),
    case(
        "tag-put-too-long",
        "PUT",
        "/v2/{repo}/manifests/" + "t" * 129,
        (400,),
        TAG_CODES,
        headers={"Content-Type": OCI_MANIFEST},
        body=b"{manifest}",
        deviates=TEXT_404,
    ),
    case(
        "tag-put-dot",
        "PUT",
        "/v2/{repo}/manifests/.hidden",
        (400,),
        TAG_CODES,
        headers={"Content-Type": OCI_MANIFEST},
        body=b"{manifest}",
        deviates=TEXT_404,
    ),
    case(
        "tag-put-unicode",
        "PUT",
        "/v2/{repo}/manifests/%C3%A9",
        (400,),
        TAG_CODES,
        headers={"Content-Type": OCI_MANIFEST},
        body=b"{manifest}",
        deviates=TEXT_404,
    ),
    # --- manifests ----------------------------------------------------------------------
    case(
        "manifest-garbage-content-type",
        "PUT",
        "/v2/{repo}/manifests/v9",
        (400, 415),
        ("MANIFEST_INVALID", "UNSUPPORTED"),
        headers={"Content-Type": "a/b/c;;;=="},
        body=b"{manifest}",
        deviates="2.8 falls back to schema1 parsing",
    ),
    case(
        "manifest-deep-json",
        "PUT",
        "/v2/{repo}/manifests/v9",
        (400,),
        ("MANIFEST_INVALID",),
        headers={"Content-Type": OCI_MANIFEST},
        body=b"[" * 100_000 + b"]" * 100_000,
        deviates="2.8 answers 400 with its own code",
    ),
    case("manifest-unsupported-method", "POST", "/v2/{repo}/manifests/v1", (404, 405), (), deviates=TEXT_404),
    # --- upload sessions ----------------------------------------------------------------
    case(
        "upload-not-a-uuid",
        "GET",
        "/v2/{repo}/blobs/uploads/not-a-uuid",
        (400, 404),
        ("BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID"),
    ),
    case(
        "upload-traversal",
        "GET",
        "/v2/{repo}/blobs/uploads/..%2f..%2f..%2fetc%2fpasswd",
        (400, 404),
        ("BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID", *UNROUTABLE),
        deviates=TEXT_404,
    ),
    case(
        "upload-put-garbage-digest", "PUT", "{upload}{sep}digest=garbage", (400,), DIGEST_CODES, body=b"data"
    ),
    case(
        "upload-put-short-digest", "PUT", "{upload}{sep}digest=sha256:abc", (400,), DIGEST_CODES, body=b"data"
    ),
    case(
        "upload-put-two-digests",
        "PUT",
        "{upload}{sep}digest=" + sha256(b"data") + "&digest=" + sha256(b"x"),
        (201, 400),
        DIGEST_CODES,
        body=b"data",
    ),
    case(
        "upload-content-range-garbage",
        "PATCH",
        "{upload}",
        (400, 416),
        RANGE_CODES,
        headers={"Content-Range": "abc"},
        body=b"data",
        deviates=NO_CHECK,
    ),
    case(
        "upload-content-range-reversed",
        "PATCH",
        "{upload}",
        (400, 416),
        RANGE_CODES,
        headers={"Content-Range": "5-2"},
        body=b"data",
        deviates=NO_CHECK,
    ),
    case(
        "upload-content-range-negative",
        "PATCH",
        "{upload}",
        (400, 416),
        RANGE_CODES,
        headers={"Content-Range": "-1-2"},
        body=b"data",
        deviates=NO_CHECK,
    ),
    case(
        "upload-content-range-huge",
        "PATCH",
        "{upload}",
        (400, 416),
        RANGE_CODES,
        headers={"Content-Range": "0-99999999999999999999999"},
        body=b"data",
        deviates=NO_CHECK,
    ),
    case(
        "upload-content-range-empty",
        "PATCH",
        "{upload}",
        (202, 400, 416),
        RANGE_CODES,
        headers={"Content-Range": ""},
        body=b"data",
    ),
    case(
        "upload-content-range-http-style",
        "PATCH",
        "{upload}",
        (202, 400, 416),
        RANGE_CODES,
        headers={"Content-Range": "bytes 0-3/4"},
        body=b"data",
    ),
    case("upload-empty-patch", "PATCH", "{upload}", (202, 400, 416), RANGE_CODES, body=b""),
    case(
        "upload-empty-patch-range",
        "PATCH",
        "{upload}",
        (202, 400, 416),
        RANGE_CODES,
        headers={"Content-Range": "0-0"},
        body=b"",
    ),
    case(
        "upload-post-garbage-digest",
        "POST",
        "/v2/{repo}/blobs/uploads/?digest=garbage",
        (400,),
        DIGEST_CODES,
        body=b"data",
        deviates=NO_CHECK,
    ),
    case(
        "upload-post-bad-algorithm",
        "POST",
        "/v2/{repo}/blobs/uploads/?digest-algorithm=..%2f..",
        (400,),
        (*DIGEST_CODES, "UNSUPPORTED"),
        deviates=NO_CHECK,
    ),
    case(
        "mount-garbage-digest",
        "POST",
        "/v2/{repo}/blobs/uploads/?mount=garbage&from={repo}",
        (202, 400),
        DIGEST_CODES,
    ),
    case(
        "mount-invalid-from",
        "POST",
        "/v2/{repo}/blobs/uploads/?mount=" + sha256(b"x") + "&from=..%2f..",
        (202, 400, 404),
        NAME_CODES,
    ),
    # --- ranges -------------------------------------------------------------------------
    case(
        "range-garbage",
        "GET",
        "/v2/{repo}/blobs/{blob}",
        (416,),
        ("RANGE_INVALID",),
        headers={"Range": "bytes=abc"},
        deviates="the Debian build drops the connection",
    ),
    case(
        "range-huge",
        "GET",
        "/v2/{repo}/blobs/{blob}",
        (416,),
        ("RANGE_INVALID",),
        headers={"Range": "bytes=99999999999999999999999-"},
        deviates="the Debian build drops the connection",
    ),
    case(
        "range-multi",
        "GET",
        "/v2/{repo}/blobs/{blob}",
        (200, 206, 416),
        ("RANGE_INVALID",),
        headers={"Range": "bytes=0-1,3-4"},
    ),
    case(
        "range-huge-suffix",
        "GET",
        "/v2/{repo}/blobs/{blob}",
        (206, 416),
        ("RANGE_INVALID",),
        headers={"Range": "bytes=-99999999999999999999999"},
        deviates="the Debian build drops the connection",
    ),
    # --- pagination ---------------------------------------------------------------------
    case("tags-n-negative", "GET", "/v2/{repo}/tags/list?n=-1", (400,), PAGE_CODES, deviates=NO_CHECK),
    case("tags-n-text", "GET", "/v2/{repo}/tags/list?n=abc", (400,), PAGE_CODES, deviates=NO_CHECK),
    case(
        "tags-n-superscript-digit",
        "GET",
        "/v2/{repo}/tags/list?n=%C2%B2",
        (400,),
        PAGE_CODES,
        deviates=NO_CHECK,
    ),
    case("tags-n-arabic-digit", "GET", "/v2/{repo}/tags/list?n=%D9%A1", (200, 400), PAGE_CODES),
    case(
        "catalog-n-superscript-digit", "GET", "/v2/_catalog?n=%C2%B2", (400,), PAGE_CODES, deviates=NO_CHECK
    ),
    case("tags-n-empty", "GET", "/v2/{repo}/tags/list?n=", (200, 400), PAGE_CODES),
    case(
        "tags-n-overflow",
        "GET",
        "/v2/{repo}/tags/list?n=99999999999999999999999999999",
        (200, 400),
        PAGE_CODES,
    ),
    case("tags-n-twice", "GET", "/v2/{repo}/tags/list?n=1&n=-5", (200, 400), PAGE_CODES),
    case("tags-last-long", "GET", "/v2/{repo}/tags/list?last=" + "z" * 5000, (200, 400), ()),
    case("tags-last-nul", "GET", "/v2/{repo}/tags/list?last=%00", (200, 400), ()),
    case("catalog-n-negative", "GET", "/v2/_catalog?n=-1", (400,), PAGE_CODES, deviates=NO_CHECK),
    case("catalog-n-text", "GET", "/v2/_catalog?n=abc", (400,), PAGE_CODES, deviates=NO_CHECK),
    case("catalog-n-overflow", "GET", "/v2/_catalog?n=99999999999999999999999999999", (200, 400), PAGE_CODES),
    case("catalog-last-traversal", "GET", "/v2/_catalog?n=2&last=..%2f..%2f..", (200, 400), ()),
    # --- other --------------------------------------------------------------------------
    case("unknown-endpoint", "GET", "/v2/{repo}/nothing-here", (404, 405), (), deviates=TEXT_404),
    case("not-v2", "GET", "/v3/", (404,), (), deviates=TEXT_404),
    case(
        "huge-header",
        "GET",
        "/v2/{repo}/tags/list",
        (200, 400, 413, 431),
        (),
        headers={"X-Filler": "x" * 6000},
    ),
]


@pytest.fixture(scope="module")
def target(registry: RegistryProcess) -> dict[str, str]:
    with httpx.Client(base_url=registry.url, timeout=30.0) as client:
        repo = unique_repo("hostile")
        image = push_image(client, repo, "v1")
    return {"repo": repo, "blob": next(iter(image.blobs)), "manifest": image.manifest.decode()}


@pytest.mark.parametrize("hostile", CASES)
def test_hostile_request(registry: RegistryProcess, target: dict[str, str], hostile: Case) -> None:
    values = dict(target)
    if "{upload}" in hostile.path:
        with httpx.Client(base_url=registry.url, timeout=30.0) as client:
            location = start_upload(client, target["repo"]).headers["location"]
        parts = urlsplit(location)
        values["upload"] = parts.path + (f"?{parts.query}" if parts.query else "")
        values["sep"] = "&" if parts.query else "?"
    path = hostile.path.format(**values)
    body = hostile.body.replace(b"{manifest}", target["manifest"].encode())
    resp = raw_request(registry.url, hostile.method, path, hostile.headers, body)
    assert_safe(resp, hostile, path)


def assert_safe(resp: RawResponse, hostile: Case, path: str) -> None:
    where = f"{hostile.method} {path[:120]}"
    assert resp.status < 500, f"{where}: {resp.status} {resp.body[:300]!r}"
    assert resp.status in hostile.statuses, (
        f"{where}: {resp.status} not in {hostile.statuses}: {resp.body[:300]!r}"
    )
    if resp.status < 400:
        return
    try:
        doc = resp.json()
    except (ValueError, UnicodeDecodeError):
        pytest.fail(f"{where}: {resp.status} with a body that is not JSON: {resp.body[:300]!r}")
    assert isinstance(doc, dict) and isinstance(doc.get("errors"), list) and doc["errors"], (
        f"{where}: {doc!r}"
    )
    codes = [e.get("code") for e in doc["errors"]]
    assert all(isinstance(c, str) and c in KNOWN_CODES for c in codes), f"{where}: unknown codes {codes}"
    if hostile.codes:
        assert any(c in hostile.codes for c in codes), (
            f"{where}: codes {codes}, expected one of {hostile.codes}"
        )
    assert resp.headers.get("content-type", "").startswith("application/json"), (
        f"{where}: not application/json"
    )


def test_nothing_escaped(registry: RegistryProcess, target: dict[str, str]) -> None:
    """After the traversal attempts, every repository in the catalog has a valid name."""
    names: list[str] = []
    with httpx.Client(base_url=registry.url, timeout=30.0) as client:
        url: str | None = "/v2/_catalog?n=1000"
        while url:
            resp = client.get(url)
            assert resp.status_code == 200
            names.extend(resp.json()["repositories"])
            url = next_link(resp)
    assert target["repo"] in names
    for name in names:
        assert VALID_NAME.fullmatch(name), f"invalid repository name in the catalog: {name!r}"
