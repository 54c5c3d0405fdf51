"""Blob uploads: monolithic, single POST, chunked, streamed; session status, cancel, expiry;
digest verification and sha512."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.api.oci import (
    assert_error,
    distribution_deviates,
    push_blob,
    random_bytes,
    sha256,
    sha512,
    start_upload,
    unique_repo,
    with_query,
)
from tests.support.servers import RegistryProcess

OCTET = {"Content-Type": "application/octet-stream"}


def patch_chunk(client: httpx.Client, location: str, chunk: bytes, start: int) -> httpx.Response:
    return client.patch(
        location,
        content=chunk,
        headers={**OCTET, "Content-Range": f"{start}-{start + len(chunk) - 1}"},
    )


def assert_blob(client: httpx.Client, repo: str, digest: str, data: bytes) -> None:
    resp = client.get(f"/v2/{repo}/blobs/{digest}")
    assert resp.status_code == 200, f"GET {digest} in {repo}: {resp.status_code} {resp.text}"
    assert resp.content == data
    assert resp.headers["docker-content-digest"] == digest


def assert_created(resp: httpx.Response, digest: str) -> None:
    assert resp.status_code == 201, (
        f"{resp.request.method} {resp.request.url}: {resp.status_code} {resp.text}"
    )
    assert resp.headers.get("location"), "201 without Location"
    assert resp.headers.get("docker-content-digest") == digest


# --- starting a session ------------------------------------------------------------------


def test_post_starts_a_session(client: httpx.Client, repo: str) -> None:
    resp = start_upload(client, repo)
    upload_id = resp.headers.get("docker-upload-uuid")
    assert upload_id, "POST without Docker-Upload-UUID"
    assert upload_id in resp.headers["location"], "the Location names the session"
    if "range" in resp.headers:
        assert resp.headers["range"] in ("0-0", "0--1")
    minimum = resp.headers.get("oci-chunk-min-length")
    if minimum is not None:
        assert minimum.isdigit(), f"OCI-Chunk-Min-Length is not a size: {minimum!r}"


def test_two_sessions_are_distinct(client: httpx.Client, repo: str) -> None:
    first = start_upload(client, repo).headers["location"]
    second = start_upload(client, repo).headers["location"]
    assert first != second


# --- monolithic ----------------------------------------------------------------------------


def test_monolithic_post_then_put(client: httpx.Client, repo: str) -> None:
    data = random_bytes(5000)
    digest = sha256(data)
    location = start_upload(client, repo).headers["location"]
    resp = client.put(with_query(location, {"digest": digest}), content=data, headers=OCTET)
    assert_created(resp, digest)
    # The Location of a finished upload is a pullable blob URL.
    pulled = client.get(resp.headers["location"])
    assert pulled.status_code == 200
    assert pulled.content == data
    assert_blob(client, repo, digest, data)


@distribution_deviates("answers a single POST with a body by 202 and ignores the body")
def test_single_post_with_digest(client: httpx.Client, repo: str) -> None:
    data = random_bytes(3000)
    digest = sha256(data)
    resp = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data, headers=OCTET)
    assert_created(resp, digest)
    assert_blob(client, repo, digest, data)


@distribution_deviates("answers a single POST with a body by 202 and ignores the body")
def test_single_post_with_wrong_digest(client: httpx.Client, repo: str) -> None:
    data = random_bytes(100)
    wrong = sha256(b"something else")
    resp = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": wrong}, content=data, headers=OCTET)
    assert_error(resp, 400, "DIGEST_INVALID")
    assert_error(client.get(f"/v2/{repo}/blobs/{wrong}"), 404, ("BLOB_UNKNOWN", "NAME_UNKNOWN"))
    assert_error(client.get(f"/v2/{repo}/blobs/{sha256(data)}"), 404, ("BLOB_UNKNOWN", "NAME_UNKNOWN"))


def test_put_with_wrong_digest_is_rejected_and_invisible(client: httpx.Client, repo: str) -> None:
    data = random_bytes(2000)
    wrong = sha256(b"not these bytes")
    location = start_upload(client, repo).headers["location"]
    resp = client.put(with_query(location, {"digest": wrong}), content=data, headers=OCTET)
    assert_error(resp, 400, "DIGEST_INVALID")
    assert_error(client.get(f"/v2/{repo}/blobs/{wrong}"), 404, ("BLOB_UNKNOWN", "NAME_UNKNOWN"))
    assert_error(client.get(f"/v2/{repo}/blobs/{sha256(data)}"), 404, ("BLOB_UNKNOWN", "NAME_UNKNOWN"))
    assert client.head(f"/v2/{repo}/blobs/{wrong}").status_code == 404


def test_put_without_digest_is_rejected(client: httpx.Client, repo: str) -> None:
    location = start_upload(client, repo).headers["location"]
    resp = client.put(location, content=b"abc", headers=OCTET)
    assert_error(resp, 400, ("DIGEST_INVALID", "BLOB_UPLOAD_INVALID"))


def test_reupload_of_existing_blob(client: httpx.Client, repo: str) -> None:
    """Pushing the same bytes twice into one repository succeeds both times (dedup)."""
    data = random_bytes(700)
    assert push_blob(client, repo, data) == push_blob(client, repo, data)
    assert_blob(client, repo, sha256(data), data)


# --- chunked -------------------------------------------------------------------------------


def chunk_size(post: httpx.Response, wanted: int) -> int:
    minimum = int(post.headers.get("oci-chunk-min-length") or 0)
    return max(wanted, minimum)


def test_chunked_upload(client: httpx.Client, repo: str) -> None:
    post = start_upload(client, repo)
    size = chunk_size(post, 1000)
    data = random_bytes(size * 3 + 17)
    digest = sha256(data)
    location = post.headers["location"]
    upload_id = post.headers["docker-upload-uuid"]
    for start in range(0, len(data), size):
        chunk = data[start : start + size]
        resp = patch_chunk(client, location, chunk, start)
        assert resp.status_code == 202, f"PATCH {start}: {resp.status_code} {resp.text}"
        assert resp.headers["range"] == f"0-{start + len(chunk) - 1}"
        assert resp.headers["docker-upload-uuid"] == upload_id
        location = resp.headers["location"]
    resp = client.put(with_query(location, {"digest": digest}), headers={"Content-Length": "0"})
    assert_created(resp, digest)
    assert_blob(client, repo, digest, data)


def test_final_chunk_on_the_closing_put(client: httpx.Client, repo: str) -> None:
    post = start_upload(client, repo)
    size = chunk_size(post, 500)
    data = random_bytes(size + 123)
    digest = sha256(data)
    first = patch_chunk(client, post.headers["location"], data[:size], 0)
    assert first.status_code == 202
    last = data[size:]
    resp = client.put(
        with_query(first.headers["location"], {"digest": digest}),
        content=last,
        headers={**OCTET, "Content-Range": f"{size}-{len(data) - 1}"},
    )
    assert_created(resp, digest)
    assert_blob(client, repo, digest, data)


@distribution_deviates("2.8 ignores Content-Range on PATCH and appends out-of-order chunks (202)")
def test_out_of_order_chunk(client: httpx.Client, repo: str) -> None:
    post = start_upload(client, repo)
    size = chunk_size(post, 400)
    data = random_bytes(size * 3)
    digest = sha256(data)
    first = patch_chunk(client, post.headers["location"], data[:size], 0)
    assert first.status_code == 202
    location = first.headers["location"]

    # Skipping ahead, going back to the start, and overlapping are all out of order.
    for start in (2 * size, 0, size - 10):
        bad = patch_chunk(client, location, data[start : start + size], start)
        assert_error(bad, 416, ("RANGE_INVALID", "BLOB_UPLOAD_INVALID"))

    # The session survives and still holds exactly the first chunk.
    status = client.get(location)
    assert status.status_code == 204
    assert status.headers["range"] == f"0-{size - 1}"
    location = status.headers.get("location", location)
    for start in (size, 2 * size):
        resp = patch_chunk(client, location, data[start : start + size], start)
        assert resp.status_code == 202
        location = resp.headers["location"]
    assert_created(client.put(with_query(location, {"digest": digest})), digest)
    assert_blob(client, repo, digest, data)


@distribution_deviates("2.8 ignores Content-Range on PATCH and appends out-of-order chunks (202)")
def test_first_chunk_not_at_zero(client: httpx.Client, repo: str) -> None:
    location = start_upload(client, repo).headers["location"]
    resp = patch_chunk(client, location, random_bytes(100), 5)
    assert_error(resp, 416, ("RANGE_INVALID", "BLOB_UPLOAD_INVALID"))


@distribution_deviates("2.8 ignores Content-Range on PATCH and appends out-of-order chunks (202)")
def test_content_range_not_matching_the_body(client: httpx.Client, repo: str) -> None:
    location = start_upload(client, repo).headers["location"]
    resp = client.patch(location, content=random_bytes(100), headers={**OCTET, "Content-Range": "0-49"})
    assert 400 <= resp.status_code < 500
    assert_error(resp, (400, 416), ("RANGE_INVALID", "BLOB_UPLOAD_INVALID", "SIZE_INVALID"))


def test_streamed_patch_without_content_range(client: httpx.Client, repo: str) -> None:
    data = random_bytes(10_000)
    digest = sha256(data)
    post = start_upload(client, repo)
    first = client.patch(post.headers["location"], content=data[:6000], headers=OCTET)
    assert first.status_code == 202
    assert first.headers["range"] == "0-5999"
    # A second streamed PATCH appends.
    second = client.patch(first.headers["location"], content=data[6000:], headers=OCTET)
    assert second.status_code == 202
    assert second.headers["range"] == f"0-{len(data) - 1}"
    assert_created(client.put(with_query(second.headers["location"], {"digest": digest})), digest)
    assert_blob(client, repo, digest, data)


def test_streamed_patch_with_chunked_transfer_encoding(client: httpx.Client, repo: str) -> None:
    data = random_bytes(50_000)
    digest = sha256(data)

    def body() -> object:
        for start in range(0, len(data), 7000):
            yield data[start : start + 7000]

    post = start_upload(client, repo)
    resp = client.patch(post.headers["location"], content=body(), headers=OCTET)
    assert resp.status_code == 202
    assert resp.headers["range"] == f"0-{len(data) - 1}"
    assert_created(client.put(with_query(resp.headers["location"], {"digest": digest})), digest)
    assert_blob(client, repo, digest, data)


def test_interleaved_sessions_for_the_same_blob(client: httpx.Client, repo: str) -> None:
    """Two clients pushing the same layer at once: both succeed, one blob results."""
    data = random_bytes(3000)
    digest = sha256(data)
    first = start_upload(client, repo).headers["location"]
    second = start_upload(client, repo).headers["location"]
    first = client.patch(first, content=data[:1000], headers=OCTET).headers["location"]
    second = client.patch(second, content=data[:2000], headers=OCTET).headers["location"]
    first = client.patch(first, content=data[1000:], headers=OCTET).headers["location"]
    assert_created(
        client.put(with_query(second, {"digest": digest}), content=data[2000:], headers=OCTET), digest
    )
    assert_created(client.put(with_query(first, {"digest": digest})), digest)
    assert_blob(client, repo, digest, data)


# --- session status and cancel ----------------------------------------------------------


def test_session_status(client: httpx.Client, repo: str) -> None:
    post = start_upload(client, repo)
    chunk = random_bytes(chunk_size(post, 300))
    patched = patch_chunk(client, post.headers["location"], chunk, 0)
    assert patched.status_code == 202
    resp = client.get(patched.headers["location"])
    assert resp.status_code == 204
    assert resp.content == b""
    assert resp.headers["range"] == f"0-{len(chunk) - 1}"
    assert resp.headers.get("location")
    assert resp.headers["docker-upload-uuid"] == post.headers["docker-upload-uuid"]


def test_status_of_a_fresh_session(client: httpx.Client, repo: str) -> None:
    post = start_upload(client, repo)
    resp = client.get(post.headers["location"])
    assert resp.status_code == 204
    assert resp.headers["docker-upload-uuid"] == post.headers["docker-upload-uuid"]
    # Nothing received yet: "0-0" (Distribution's habit) or "0--1"; the header is required.
    assert resp.headers["range"] in ("0-0", "0--1")


def test_large_blob_in_big_chunks(client: httpx.Client, repo: str) -> None:
    """16 MiB in three PATCHes, streamed both ways, then a ranged read at the tail."""
    mib = 1024 * 1024
    data = random_bytes(16 * mib)
    digest = sha256(data)
    location = start_upload(client, repo).headers["location"]
    for start in range(0, len(data), 6 * mib):
        resp = patch_chunk(client, location, data[start : start + 6 * mib], start)
        assert resp.status_code == 202
        location = resp.headers["location"]
    assert_created(client.put(with_query(location, {"digest": digest})), digest)
    with client.stream("GET", f"/v2/{repo}/blobs/{digest}") as resp:
        assert resp.status_code == 200
        assert resp.headers["content-length"] == str(len(data))
        assert sha256(b"".join(resp.iter_bytes())) == digest
    tail = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": f"bytes={len(data) - 100}-"})
    assert tail.status_code == 206
    assert tail.content == data[-100:]


def test_cancel_session(client: httpx.Client, repo: str) -> None:
    post = start_upload(client, repo)
    patched = client.patch(post.headers["location"], content=random_bytes(100), headers=OCTET)
    assert patched.status_code == 202
    location = patched.headers["location"]
    resp = client.delete(location)
    assert resp.status_code == 204
    assert_error(client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.patch(location, content=b"x", headers=OCTET), 404, "BLOB_UPLOAD_UNKNOWN")
    data = b"late"
    assert_error(
        client.put(with_query(location, {"digest": sha256(data)}), content=data, headers=OCTET),
        404,
        "BLOB_UPLOAD_UNKNOWN",
    )
    assert_error(client.delete(location), 404, "BLOB_UPLOAD_UNKNOWN")


def test_finished_session_is_gone(client: httpx.Client, repo: str) -> None:
    data = random_bytes(100)
    location = start_upload(client, repo).headers["location"]
    assert client.put(with_query(location, {"digest": sha256(data)}), content=data).status_code == 201
    assert_error(client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.patch(location, content=b"more", headers=OCTET), 404, "BLOB_UPLOAD_UNKNOWN")


@distribution_deviates("answers 404 BLOB_UPLOAD_INVALID for a session URL without its _state")
@pytest.mark.parametrize("method", ["GET", "PATCH", "PUT", "DELETE"])
def test_unknown_session(client: httpx.Client, repo: str, method: str) -> None:
    push_blob(client, repo, b"so that the repository exists")
    url = f"/v2/{repo}/blobs/uploads/{uuid.uuid4()}"
    if method == "PUT":
        url = with_query(url, {"digest": sha256(b"x")})
    resp = client.request(method, url, content=b"x" if method in ("PATCH", "PUT") else None)
    assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")


@distribution_deviates("sessions are keyed by a signed _state parameter and answer 400 BLOB_UPLOAD_INVALID")
def test_session_of_another_repository_is_unknown(client: httpx.Client, repo: str) -> None:
    post = start_upload(client, repo)
    other = unique_repo()
    push_blob(client, other, b"other exists")
    path = httpx.URL(post.headers["location"]).copy_with(
        path=f"/v2/{other}/blobs/uploads/{post.headers['docker-upload-uuid']}"
    )
    assert_error(client.get(str(path)), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.patch(str(path), content=b"x", headers=OCTET), 404, "BLOB_UPLOAD_UNKNOWN")
    # The session in its own repository is untouched.
    assert client.get(post.headers["location"]).status_code == 204


# --- sha512 --------------------------------------------------------------------------------


@distribution_deviates("answers a sha512 upload with a sha256 Docker-Content-Digest")
def test_sha512_monolithic(client: httpx.Client, repo: str) -> None:
    data = random_bytes(4000)
    digest = sha512(data)
    location = start_upload(client, repo).headers["location"]
    resp = client.put(with_query(location, {"digest": digest}), content=data, headers=OCTET)
    assert_created(resp, digest)
    assert_blob(client, repo, digest, data)
    head = client.head(f"/v2/{repo}/blobs/{digest}")
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(data))


@distribution_deviates("has no ?digest-algorithm= (distribution-spec main, end-4c)")
def test_sha512_chunked_with_digest_algorithm(client: httpx.Client, repo: str) -> None:
    post = start_upload(client, repo, **{"digest-algorithm": "sha512"})
    size = chunk_size(post, 1000)
    data = random_bytes(size * 2 + 5)
    digest = sha512(data)
    location = post.headers["location"]
    for start in range(0, len(data), size):
        resp = patch_chunk(client, location, data[start : start + size], start)
        assert resp.status_code == 202
        location = resp.headers["location"]
    assert_created(client.put(with_query(location, {"digest": digest})), digest)
    assert_blob(client, repo, digest, data)


@distribution_deviates("answers a sha512 upload with a sha256 Docker-Content-Digest")
def test_same_bytes_under_sha256_and_sha512(client: httpx.Client, repo: str) -> None:
    data = random_bytes(500)
    assert push_blob(client, repo, data, sha512(data)) == sha512(data)
    assert push_blob(client, repo, data) == sha256(data)
    assert_blob(client, repo, sha512(data), data)
    assert_blob(client, repo, sha256(data), data)


@distribution_deviates("has no ?digest-algorithm= (distribution-spec main, end-4c)")
def test_digest_algorithm_differs_from_the_final_digest(client: httpx.Client, repo: str) -> None:
    """The session hashed with sha512 but the client closes with a sha256 digest: the
    registry verifies anyway (re-reading the bytes) or refuses; it never trusts blindly."""
    data = random_bytes(2000)
    post = start_upload(client, repo, **{"digest-algorithm": "sha512"})
    patched = client.patch(post.headers["location"], content=data, headers=OCTET)
    assert patched.status_code == 202
    resp = client.put(with_query(patched.headers["location"], {"digest": sha256(data)}))
    if resp.status_code == 201:
        assert_blob(client, repo, sha256(data), data)
    else:
        assert_error(resp, 400, ("DIGEST_INVALID", "UNSUPPORTED", "BLOB_UPLOAD_INVALID"))
    # A wrong sha256 digest is refused either way.
    post = start_upload(client, repo, **{"digest-algorithm": "sha512"})
    patched = client.patch(post.headers["location"], content=data, headers=OCTET)
    bad = client.put(with_query(patched.headers["location"], {"digest": sha256(b"other")}))
    assert_error(bad, 400, ("DIGEST_INVALID", "UNSUPPORTED", "BLOB_UPLOAD_INVALID"))


def test_sha512_wrong_digest(client: httpx.Client, repo: str) -> None:
    data = random_bytes(100)
    wrong = sha512(b"other")
    location = start_upload(client, repo).headers["location"]
    resp = client.put(with_query(location, {"digest": wrong}), content=data, headers=OCTET)
    assert_error(resp, 400, "DIGEST_INVALID")
    assert_error(client.get(f"/v2/{repo}/blobs/{wrong}"), 404, ("BLOB_UNKNOWN", "NAME_UNKNOWN"))


@distribution_deviates("has no ?digest-algorithm= (distribution-spec main, end-4c)")
def test_unsupported_digest_algorithm(client: httpx.Client, repo: str) -> None:
    resp = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest-algorithm": "md5"})
    assert_error(resp, 400, ("DIGEST_INVALID", "UNSUPPORTED"))


# --- configuration: chunk minimum and expiry ------------------------------------------------


def test_chunk_min_length_is_advertised(small_limits_registry: RegistryProcess) -> None:
    with httpx.Client(base_url=small_limits_registry.url, timeout=30.0) as client:
        post = start_upload(client, unique_repo())
        assert post.headers.get("oci-chunk-min-length") == "64"


def test_stale_session_expires(expiring_registry: RegistryProcess) -> None:
    """CARGOHOLD_UPLOADS__EXPIRY_HOURS=0.0003 (about 1.1 s): the session then answers 404."""
    with httpx.Client(base_url=expiring_registry.url, timeout=30.0) as client:
        repo = unique_repo()
        post = start_upload(client, repo)
        location = post.headers["location"]
        patched = client.patch(location, content=b"some bytes", headers=OCTET)
        assert patched.status_code == 202
        location = patched.headers["location"]
        deadline = time.monotonic() + 15
        while True:
            resp = client.get(location)
            if resp.status_code == 404 or time.monotonic() > deadline:
                break
            assert resp.status_code == 204
            time.sleep(0.25)
        assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(client.patch(location, content=b"more", headers=OCTET), 404, "BLOB_UPLOAD_UNKNOWN")
        data = b"some bytes"
        put = client.put(with_query(location, {"digest": sha256(data)}))
        assert_error(put, 404, "BLOB_UPLOAD_UNKNOWN")
        # A fresh session in the same registry still works.
        assert push_blob(client, repo, data) == sha256(data)
