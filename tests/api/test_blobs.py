"""GET/HEAD /v2/<name>/blobs/<digest>: headers, ranges, and per-repository visibility."""

from __future__ import annotations

import httpx
import pytest

from tests.api.oci import (
    assert_error,
    distribution_deviates,
    push_blob,
    random_bytes,
    sha256,
    unique_repo,
)

SIZE = 1000


@pytest.fixture
def blob(client: httpx.Client, repo: str) -> tuple[str, bytes]:
    data = random_bytes(SIZE)
    return push_blob(client, repo, data), data


def test_get_blob(client: httpx.Client, repo: str, blob: tuple[str, bytes]) -> None:
    digest, data = blob
    resp = client.get(f"/v2/{repo}/blobs/{digest}")
    assert resp.status_code == 200
    assert resp.content == data
    assert resp.headers["docker-content-digest"] == digest
    assert resp.headers["content-length"] == str(SIZE)


def test_head_blob(client: httpx.Client, repo: str, blob: tuple[str, bytes]) -> None:
    digest, _ = blob
    resp = client.head(f"/v2/{repo}/blobs/{digest}")
    assert resp.status_code == 200
    assert resp.content == b""
    assert resp.headers["docker-content-digest"] == digest
    assert resp.headers["content-length"] == str(SIZE)


def test_get_unknown_blob(client: httpx.Client, repo: str, blob: tuple[str, bytes]) -> None:
    resp = client.get(f"/v2/{repo}/blobs/{sha256(b'never pushed')}")
    assert_error(resp, 404, "BLOB_UNKNOWN")


def test_head_unknown_blob(client: httpx.Client, repo: str, blob: tuple[str, bytes]) -> None:
    resp = client.head(f"/v2/{repo}/blobs/{sha256(b'never pushed')}")
    assert resp.status_code == 404
    assert resp.content == b""


def test_get_blob_in_unknown_repository(client: httpx.Client) -> None:
    resp = client.get(f"/v2/{unique_repo()}/blobs/{sha256(b'nothing')}")
    assert_error(resp, 404, ("BLOB_UNKNOWN", "NAME_UNKNOWN"))


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=100-199", 100, 199),
        ("bytes=990-", 990, SIZE - 1),
        ("bytes=-10", SIZE - 10, SIZE - 1),
        ("bytes=995-5000", 995, SIZE - 1),  # an end past the blob is clamped (RFC 9110)
        ("bytes=0-0", 0, 0),
    ],
)
def test_range(
    client: httpx.Client, repo: str, blob: tuple[str, bytes], range_header: str, start: int, end: int
) -> None:
    digest, data = blob
    resp = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": range_header})
    assert resp.status_code == 206
    assert resp.headers["content-range"] == f"bytes {start}-{end}/{SIZE}"
    assert resp.headers["content-length"] == str(end - start + 1)
    assert resp.content == data[start : end + 1]


@distribution_deviates("the Debian 2.8.2 build drops the connection on a 416 instead of answering")
@pytest.mark.parametrize(
    "range_header",
    [
        f"bytes={SIZE}-",  # starts at the end
        f"bytes={SIZE + 10}-{SIZE + 20}",  # entirely past the end
        "bytes=-0",  # empty suffix
        "bytes=abc",  # malformed
        "bytes=20-10",  # last < first
        "bytes=",  # empty
    ],
)
def test_unsatisfiable_or_malformed_range(
    client: httpx.Client, repo: str, blob: tuple[str, bytes], range_header: str
) -> None:
    digest, _ = blob
    resp = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": range_header})
    # The spec has no error code for this; RANGE_INVALID is the code Docker/Distribution
    # register with status 416.
    assert_error(resp, 416, "RANGE_INVALID")
    assert resp.headers["content-range"] == f"bytes */{SIZE}"


@distribution_deviates("answers 416 (and drops the connection) for a Range with an unknown unit")
def test_range_with_unknown_unit_is_ignored(client: httpx.Client, repo: str, blob: tuple[str, bytes]) -> None:
    # RFC 9110 14.2: an origin server MUST ignore a Range with a unit it does not understand.
    digest, data = blob
    resp = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "items=0-10"})
    assert resp.status_code == 200
    assert resp.content == data


def test_blob_of_another_repository_is_invisible(client: httpx.Client, blob: tuple[str, bytes]) -> None:
    """The bytes exist (global dedup), but repository B never received or mounted them."""
    digest, _ = blob
    other = unique_repo()
    push_blob(client, other, random_bytes(10))  # B exists, with another blob
    assert_error(client.get(f"/v2/{other}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    head = client.head(f"/v2/{other}/blobs/{digest}")
    assert head.status_code == 404
    ranged = client.get(f"/v2/{other}/blobs/{digest}", headers={"Range": "bytes=0-9"})
    assert_error(ranged, 404, "BLOB_UNKNOWN")


def test_blob_pushed_to_two_repositories(client: httpx.Client, blob: tuple[str, bytes]) -> None:
    """Pushing the same bytes again into another repository links them there."""
    digest, data = blob
    other = unique_repo()
    assert push_blob(client, other, data) == digest
    resp = client.get(f"/v2/{other}/blobs/{digest}")
    assert resp.status_code == 200
    assert resp.content == data


def test_empty_blob(client: httpx.Client, repo: str) -> None:
    digest = push_blob(client, repo, b"")
    assert digest == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    resp = client.get(f"/v2/{repo}/blobs/{digest}")
    assert resp.status_code == 200
    assert resp.content == b""
    assert resp.headers["content-length"] == "0"
