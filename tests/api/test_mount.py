"""Cross-repository blob mount: POST /v2/<name>/blobs/uploads/?mount=<digest>&from=<other>."""

from __future__ import annotations

import httpx

from tests.api.oci import (
    assert_error,
    distribution_deviates,
    push_blob,
    random_bytes,
    sha256,
    unique_repo,
    with_query,
)


def mount(client: httpx.Client, repo: str, digest: str, source: str | None) -> httpx.Response:
    params = {"mount": digest}
    if source is not None:
        params["from"] = source
    return client.post(f"/v2/{repo}/blobs/uploads/", params=params, headers={"Content-Length": "0"})


def assert_session(resp: httpx.Response) -> str:
    """A mount that did not happen falls back to an ordinary upload session."""
    assert resp.status_code == 202, f"{resp.request.url}: {resp.status_code} {resp.text}"
    assert resp.headers.get("location")
    return resp.headers["location"]


def test_mount_from_another_repository(client: httpx.Client) -> None:
    source, target = unique_repo(), unique_repo()
    data = random_bytes(800)
    digest = push_blob(client, source, data)
    resp = mount(client, target, digest, source)
    assert resp.status_code == 201, resp.text
    assert resp.headers["docker-content-digest"] == digest
    pulled = client.get(resp.headers["location"])
    assert pulled.status_code == 200
    assert pulled.content == data
    got = client.get(f"/v2/{target}/blobs/{digest}")
    assert got.status_code == 200
    assert got.content == data
    # The source keeps its blob.
    assert client.head(f"/v2/{source}/blobs/{digest}").status_code == 200


def test_mount_into_existing_repository(client: httpx.Client) -> None:
    source, target = unique_repo(), unique_repo()
    push_blob(client, target, b"the target already exists")
    digest = push_blob(client, source, random_bytes(100))
    resp = mount(client, target, digest, source)
    assert resp.status_code == 201
    assert client.head(f"/v2/{target}/blobs/{digest}").status_code == 200


def test_mount_of_a_blob_already_there(client: httpx.Client) -> None:
    source, target = unique_repo(), unique_repo()
    data = random_bytes(100)
    digest = push_blob(client, source, data)
    push_blob(client, target, data)
    resp = mount(client, target, digest, source)
    assert resp.status_code == 201
    assert resp.headers["docker-content-digest"] == digest


@distribution_deviates("2.8 ignores a mount without from= and opens a session (202)")
def test_mount_without_from(client: httpx.Client) -> None:
    """The registry MAY treat from as optional: cargohold mounts any blob readable in some
    repository (anonymous access, so every repository is readable)."""
    source, target = unique_repo(), unique_repo()
    data = random_bytes(300)
    digest = push_blob(client, source, data)
    resp = mount(client, target, digest, None)
    assert resp.status_code == 201, resp.text
    assert resp.headers["docker-content-digest"] == digest
    got = client.get(f"/v2/{target}/blobs/{digest}")
    assert got.status_code == 200
    assert got.content == data


def test_mount_of_unknown_blob_starts_a_session(client: httpx.Client) -> None:
    source, target = unique_repo(), unique_repo()
    push_blob(client, source, b"source exists")
    data = random_bytes(200)
    digest = sha256(data)
    location = assert_session(mount(client, target, digest, source))
    # The session is an ordinary one: the client uploads the bytes instead.
    resp = client.put(with_query(location, {"digest": digest}), content=data)
    assert resp.status_code == 201
    assert client.get(f"/v2/{target}/blobs/{digest}").content == data


def test_mount_from_repository_that_lacks_the_blob(client: httpx.Client) -> None:
    """The blob exists in the registry (in C) but not in the named source A: no mount,
    and nothing leaks into the target."""
    holder, source, target = unique_repo(), unique_repo(), unique_repo()
    digest = push_blob(client, holder, random_bytes(100))
    push_blob(client, source, b"source exists without that blob")
    assert_session(mount(client, target, digest, source))
    assert_error(client.get(f"/v2/{target}/blobs/{digest}"), 404, ("BLOB_UNKNOWN", "NAME_UNKNOWN"))


def test_mount_from_unknown_repository(client: httpx.Client) -> None:
    holder, target = unique_repo(), unique_repo()
    digest = push_blob(client, holder, random_bytes(100))
    assert_session(mount(client, target, digest, unique_repo()))
    assert_error(client.get(f"/v2/{target}/blobs/{digest}"), 404, ("BLOB_UNKNOWN", "NAME_UNKNOWN"))


def test_mount_with_invalid_from(client: httpx.Client) -> None:
    holder, target = unique_repo(), unique_repo()
    digest = push_blob(client, holder, random_bytes(100))
    resp = mount(client, target, digest, "INVALID/../name")
    assert resp.status_code < 500
    if resp.status_code >= 400:
        assert_error(resp, (400, 404), ("NAME_INVALID", "NAME_UNKNOWN", "BLOB_UNKNOWN"))
    else:
        assert_session(resp)
    assert client.head(f"/v2/{target}/blobs/{digest}").status_code == 404
