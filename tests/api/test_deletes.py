"""DELETE of manifests (by digest), tags, blobs and the unknown; deletes disabled by config."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.api.oci import (
    ALL_MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    assert_error,
    descriptor,
    distribution_deviates,
    encode,
    image_manifest,
    push_blob,
    push_image,
    push_index,
    random_bytes,
    sha256,
    unique_repo,
)
from tests.support.servers import RegistryProcess

ACCEPT = {"Accept": ", ".join(ALL_MANIFEST_TYPES)}


def manifest_status(client: httpx.Client, repo: str, reference: str) -> int:
    return client.get(f"/v2/{repo}/manifests/{reference}", headers=ACCEPT).status_code


def listed_tags(client: httpx.Client, repo: str) -> list[str]:
    resp = client.get(f"/v2/{repo}/tags/list")
    if resp.status_code == 404:
        assert_error(resp, 404, "NAME_UNKNOWN")
        return []
    assert resp.status_code == 200
    return resp.json()["tags"] or []


def test_delete_manifest_by_digest_removes_its_tags(client: httpx.Client, repo: str) -> None:
    image = push_image(client, repo, "a")
    client.put(f"/v2/{repo}/manifests/b", content=image.manifest, headers={"Content-Type": image.media_type})
    keep = push_image(client, repo, "keep")
    resp = client.delete(f"/v2/{repo}/manifests/{image.digest}")
    assert resp.status_code == 202
    for reference in (image.digest, "a", "b"):
        assert_error(client.get(f"/v2/{repo}/manifests/{reference}", headers=ACCEPT), 404, "MANIFEST_UNKNOWN")
        assert client.head(f"/v2/{repo}/manifests/{reference}", headers=ACCEPT).status_code == 404
    assert listed_tags(client, repo) == ["keep"]
    assert manifest_status(client, repo, keep.digest) == 200


@distribution_deviates("2.8 cannot delete a tag (400 DIGEST_INVALID)")
def test_delete_tag_keeps_the_manifest(client: httpx.Client, repo: str) -> None:
    image = push_image(client, repo, "a")
    client.put(f"/v2/{repo}/manifests/b", content=image.manifest, headers={"Content-Type": image.media_type})
    resp = client.delete(f"/v2/{repo}/manifests/a")
    assert resp.status_code == 202
    assert_error(client.get(f"/v2/{repo}/manifests/a", headers=ACCEPT), 404, "MANIFEST_UNKNOWN")
    assert manifest_status(client, repo, "b") == 200
    got = client.get(f"/v2/{repo}/manifests/{image.digest}", headers=ACCEPT)
    assert got.status_code == 200
    assert got.content == image.manifest
    assert listed_tags(client, repo) == ["b"]


@distribution_deviates("2.8 cannot delete a tag (400 DIGEST_INVALID)")
def test_delete_last_tag_keeps_the_manifest(client: httpx.Client, repo: str) -> None:
    image = push_image(client, repo, "only")
    assert client.delete(f"/v2/{repo}/manifests/only").status_code == 202
    assert manifest_status(client, repo, image.digest) == 200
    assert listed_tags(client, repo) == []


def test_delete_index_keeps_children(client: httpx.Client, repo: str) -> None:
    child = push_image(client, repo, None)
    index = push_index(client, repo, "multi", [child])
    assert client.delete(f"/v2/{repo}/manifests/{index.digest}").status_code == 202
    assert manifest_status(client, repo, "multi") == 404
    assert manifest_status(client, repo, child.digest) == 200


def test_delete_blob(client: httpx.Client, repo: str) -> None:
    data = random_bytes(300)
    digest = push_blob(client, repo, data)
    resp = client.delete(f"/v2/{repo}/blobs/{digest}")
    assert resp.status_code == 202
    assert_error(client.get(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    assert client.head(f"/v2/{repo}/blobs/{digest}").status_code == 404
    assert_error(client.delete(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")


def test_delete_blob_leaves_other_repositories_alone(client: httpx.Client, repo: str) -> None:
    """One stored copy, two links: unlinking in A must not remove the bytes from B."""
    data = random_bytes(300)
    digest = push_blob(client, repo, data)
    other = unique_repo()
    push_blob(client, other, data)
    assert client.delete(f"/v2/{repo}/blobs/{digest}").status_code == 202
    got = client.get(f"/v2/{other}/blobs/{digest}")
    assert got.status_code == 200
    assert got.content == data


def test_manifest_cannot_reference_a_deleted_blob(client: httpx.Client, repo: str) -> None:
    data = random_bytes(100)
    digest = push_blob(client, repo, data)
    config = b'{"os": "linux"}'
    push_blob(client, repo, config)
    assert client.delete(f"/v2/{repo}/blobs/{digest}").status_code == 202
    body = encode(image_manifest(descriptor(OCI_CONFIG, config), [descriptor(OCI_LAYER, data)]))
    resp = client.put(f"/v2/{repo}/manifests/v1", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert_error(resp, 400, "MANIFEST_BLOB_UNKNOWN")


def test_deleted_blob_cannot_be_mounted_from(client: httpx.Client, repo: str) -> None:
    digest = push_blob(client, repo, random_bytes(100))
    assert client.delete(f"/v2/{repo}/blobs/{digest}").status_code == 202
    target = unique_repo()
    resp = client.post(f"/v2/{target}/blobs/uploads/", params={"mount": digest, "from": repo})
    assert resp.status_code == 202
    assert client.head(f"/v2/{target}/blobs/{digest}").status_code == 404


def test_blob_can_be_pushed_again_after_delete(client: httpx.Client, repo: str) -> None:
    data = random_bytes(300)
    digest = push_blob(client, repo, data)
    assert client.delete(f"/v2/{repo}/blobs/{digest}").status_code == 202
    assert push_blob(client, repo, data) == digest
    assert client.get(f"/v2/{repo}/blobs/{digest}").content == data


def test_manifest_can_be_pushed_again_after_delete(client: httpx.Client, repo: str) -> None:
    image = push_image(client, repo, "v1")
    assert client.delete(f"/v2/{repo}/manifests/{image.digest}").status_code == 202
    resp = client.put(
        f"/v2/{repo}/manifests/v1", content=image.manifest, headers={"Content-Type": image.media_type}
    )
    assert resp.status_code == 201
    assert client.get(f"/v2/{repo}/manifests/v1", headers=ACCEPT).content == image.manifest


def test_delete_unknown_manifest(client: httpx.Client, repo: str) -> None:
    push_image(client, repo, "v1")
    resp = client.delete(f"/v2/{repo}/manifests/{sha256(b'none')}")
    assert_error(resp, 404, "MANIFEST_UNKNOWN")


@distribution_deviates("2.8 cannot delete a tag (400 DIGEST_INVALID)")
def test_delete_unknown_tag(client: httpx.Client, repo: str) -> None:
    push_image(client, repo, "v1")
    assert_error(client.delete(f"/v2/{repo}/manifests/nope"), 404, "MANIFEST_UNKNOWN")


def test_delete_unknown_blob(client: httpx.Client, repo: str) -> None:
    push_blob(client, repo, b"exists")
    assert_error(client.delete(f"/v2/{repo}/blobs/{sha256(b'none')}"), 404, "BLOB_UNKNOWN")


def test_delete_blob_of_another_repository(client: httpx.Client, repo: str) -> None:
    digest = push_blob(client, unique_repo(), random_bytes(100))
    push_blob(client, repo, b"exists")
    assert_error(client.delete(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")


def test_delete_in_unknown_repository(client: httpx.Client) -> None:
    name = unique_repo()
    assert_error(
        client.delete(f"/v2/{name}/manifests/{sha256(b'x')}"), 404, ("NAME_UNKNOWN", "MANIFEST_UNKNOWN")
    )
    assert_error(client.delete(f"/v2/{name}/blobs/{sha256(b'x')}"), 404, ("NAME_UNKNOWN", "BLOB_UNKNOWN"))


def test_delete_with_invalid_digest(client: httpx.Client, repo: str) -> None:
    push_blob(client, repo, b"exists")
    assert_error(client.delete(f"/v2/{repo}/blobs/sha256:1234"), 400, "DIGEST_INVALID")
    resp = client.delete(f"/v2/{repo}/manifests/sha256:1234")
    assert_error(resp, (400, 404), ("DIGEST_INVALID", "MANIFEST_UNKNOWN"))


# --- deletes disabled ----------------------------------------------------------------------


@pytest.fixture
def no_delete_client(no_delete_registry: RegistryProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=no_delete_registry.url, timeout=30.0) as c:
        yield c


def test_deletes_disabled(no_delete_client: httpx.Client) -> None:
    client = no_delete_client
    repo = unique_repo()
    image = push_image(client, repo, "v1")
    blob = next(iter(image.blobs))
    for url in (
        f"/v2/{repo}/manifests/{image.digest}",
        f"/v2/{repo}/manifests/v1",
        f"/v2/{repo}/blobs/{blob}",
    ):
        assert_error(client.delete(url), 405, "UNSUPPORTED")
    # Nothing was deleted.
    assert client.get(f"/v2/{repo}/manifests/v1", headers=ACCEPT).content == image.manifest
    assert client.head(f"/v2/{repo}/blobs/{blob}").status_code == 200


def test_upload_cancel_still_works_when_deletes_are_disabled(no_delete_client: httpx.Client) -> None:
    """Cancelling an upload session is not content deletion."""
    client = no_delete_client
    post = client.post(f"/v2/{unique_repo()}/blobs/uploads/")
    assert post.status_code == 202
    assert client.delete(post.headers["location"]).status_code == 204
