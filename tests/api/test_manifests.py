"""GET/HEAD/PUT /v2/<name>/manifests/<reference>: every manifest type, content negotiation,
byte-exact storage, validation errors, subject, size limit, push by digest and multi-tag."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api.oci import (
    ALL_MANIFEST_TYPES,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    EMPTY_CONFIG,
    EMPTY_DIGEST,
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Image,
    assert_error,
    descriptor,
    distribution_deviates,
    encode,
    image_manifest,
    index_manifest,
    push_blob,
    push_image,
    push_index,
    put_manifest,
    random_bytes,
    sha256,
    sha512,
    unique_repo,
)

ACCEPT_ALL = ", ".join(ALL_MANIFEST_TYPES)
MIB = 1024 * 1024


def assert_manifest(client: httpx.Client, image: Image, reference: str, accept: str = ACCEPT_ALL) -> None:
    """GET and HEAD return the exact pushed bytes with the stored media type."""
    url = f"/v2/{image.repo}/manifests/{reference}"
    got = client.get(url, headers={"Accept": accept})
    assert got.status_code == 200, f"GET {url}: {got.status_code} {got.text}"
    assert got.content == image.manifest, "manifest bytes changed"
    assert got.headers["content-type"] == image.media_type
    assert got.headers["docker-content-digest"] == image.digest
    assert got.headers["content-length"] == str(len(image.manifest))
    head = client.head(url, headers={"Accept": accept})
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == image.media_type
    assert head.headers["docker-content-digest"] == image.digest
    assert head.headers["content-length"] == str(len(image.manifest))


def config_descriptor(client: httpx.Client, repo: str) -> dict[str, object]:
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": random_bytes(8).hex()}).encode()
    push_blob(client, repo, config)
    return descriptor(OCI_CONFIG, config)


# --- the manifest types -------------------------------------------------------------------


def test_put_response(client: httpx.Client, repo: str) -> None:
    config = config_descriptor(client, repo)
    body = encode(image_manifest(config, []))
    resp = put_manifest(client, repo, "v1", body, OCI_MANIFEST)
    assert resp.status_code == 201
    assert resp.headers["docker-content-digest"] == sha256(body)
    location = resp.headers["location"]
    pulled = client.get(location, headers={"Accept": OCI_MANIFEST})
    assert pulled.status_code == 200
    assert pulled.content == body


def test_oci_image_manifest(client: httpx.Client, repo: str) -> None:
    image = push_image(client, repo, "v1", layer_count=2)
    assert_manifest(client, image, "v1")
    assert_manifest(client, image, image.digest)
    assert_manifest(client, image, "v1", accept=OCI_MANIFEST)


def test_oci_image_index(client: httpx.Client, repo: str) -> None:
    children = [push_image(client, repo, None) for _ in range(2)]
    index = push_index(client, repo, "multi", children)
    assert_manifest(client, index, "multi")
    assert_manifest(client, index, index.digest, accept=OCI_INDEX)
    for child in children:
        assert_manifest(client, child, child.digest)


def test_index_of_indexes(client: httpx.Client, repo: str) -> None:
    inner = push_index(client, repo, None, [push_image(client, repo, None)])
    outer = push_index(client, repo, "nested", [inner])
    assert_manifest(client, outer, "nested")


def test_docker_schema2_manifest(client: httpx.Client, repo: str) -> None:
    image = push_image(client, repo, "docker", docker=True)
    assert image.media_type == DOCKER_MANIFEST
    assert_manifest(client, image, "docker")
    assert_manifest(client, image, image.digest, accept=DOCKER_MANIFEST)


def test_docker_manifest_list(client: httpx.Client, repo: str) -> None:
    children = [push_image(client, repo, None, docker=True) for _ in range(2)]
    index = push_index(client, repo, "list", children, docker=True)
    assert index.media_type == DOCKER_LIST
    assert_manifest(client, index, "list")
    assert_manifest(client, index, "list", accept=f"{DOCKER_LIST}, {DOCKER_MANIFEST}")


def test_oci_artifact_with_empty_config(client: httpx.Client, repo: str) -> None:
    assert sha256(EMPTY_CONFIG) == EMPTY_DIGEST
    artifact = push_image(client, repo, "sbom", artifact_type="application/vnd.example.sbom.v1+json")
    doc = json.loads(artifact.manifest)
    assert doc["artifactType"] == "application/vnd.example.sbom.v1+json"
    assert doc["config"] == {"mediaType": OCI_EMPTY, "digest": EMPTY_DIGEST, "size": 2}
    assert_manifest(client, artifact, "sbom")
    config = client.get(f"/v2/{repo}/blobs/{EMPTY_DIGEST}")
    assert config.status_code == 200
    assert config.content == b"{}"


def test_manifest_without_layers(client: httpx.Client, repo: str) -> None:
    body = encode(image_manifest(config_descriptor(client, repo), []))
    assert put_manifest(client, repo, "empty", body, OCI_MANIFEST).status_code == 201
    assert client.get(f"/v2/{repo}/manifests/empty", headers={"Accept": OCI_MANIFEST}).content == body


def test_tag_moves_to_new_manifest(client: httpx.Client, repo: str) -> None:
    old = push_image(client, repo, "moving")
    new = push_image(client, repo, "moving")
    assert_manifest(client, new, "moving")
    assert_manifest(client, old, old.digest)  # the old manifest stays reachable by digest


def test_same_manifest_under_two_tags(client: httpx.Client, repo: str) -> None:
    image = push_image(client, repo, "a")
    assert put_manifest(client, repo, "b", image.manifest, image.media_type).status_code == 201
    assert_manifest(client, image, "a")
    assert_manifest(client, image, "b")


def test_manifest_with_a_long_tag(client: httpx.Client, repo: str) -> None:
    tag = "A_" + "x" * 126  # 128 characters, the maximum, may start with an uppercase letter
    image = push_image(client, repo, tag)
    assert_manifest(client, image, tag)


def test_content_type_parameters_are_ignored(client: httpx.Client, repo: str) -> None:
    """Registries SHOULD ignore Content-Type parameters, and SHOULD NOT send any back."""
    body = encode(image_manifest(config_descriptor(client, repo), []))
    resp = put_manifest(client, repo, "v1", body, f"{OCI_MANIFEST}; charset=utf-8")
    assert resp.status_code == 201, resp.text
    got = client.get(f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert got.headers["content-type"] == OCI_MANIFEST
    assert got.content == body


def test_manifest_without_media_type_field(client: httpx.Client, repo: str) -> None:
    """mediaType is a SHOULD in the image spec: the Content-Type then decides."""
    doc = image_manifest(config_descriptor(client, repo), [])
    del doc["mediaType"]
    body = encode(doc)
    assert put_manifest(client, repo, "v1", body, OCI_MANIFEST).status_code == 201
    got = client.get(f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert got.status_code == 200
    assert got.headers["content-type"] == OCI_MANIFEST
    assert got.content == body


# --- content negotiation -----------------------------------------------------------------


def test_accept_with_parameters_and_quality(client: httpx.Client, repo: str) -> None:
    image = push_image(client, repo, "v1")
    accept = f"{DOCKER_MANIFEST};q=0.9, {OCI_MANIFEST};q=0.5, */*;q=0.1"
    assert_manifest(client, image, "v1", accept=accept)


def test_accept_as_repeated_headers(client: httpx.Client, repo: str) -> None:
    image = push_image(client, repo, "v1")
    headers = [("Accept", DOCKER_MANIFEST), ("Accept", OCI_MANIFEST)]
    resp = client.get(f"/v2/{repo}/manifests/v1", headers=headers)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == OCI_MANIFEST
    assert resp.content == image.manifest


@distribution_deviates("2.8 answers 404 MANIFEST_UNKNOWN for an OCI manifest when Accept is absent")
def test_no_accept_header_returns_the_stored_manifest(client: httpx.Client, repo: str) -> None:
    image = push_image(client, repo, "v1")
    resp = client.get(f"/v2/{repo}/manifests/v1")
    assert resp.status_code == 200
    assert resp.content == image.manifest
    assert resp.headers["content-type"] == OCI_MANIFEST


def test_accept_that_excludes_the_stored_type(client: httpx.Client, repo: str) -> None:
    """A registry never converts a manifest: it answers 404 MANIFEST_UNKNOWN, or the stored
    manifest unchanged (the client then sees the Content-Type and decides)."""
    image = push_image(client, repo, "v1")
    resp = client.get(f"/v2/{repo}/manifests/v1", headers={"Accept": DOCKER_MANIFEST})
    if resp.status_code == 404:
        assert_error(resp, 404, "MANIFEST_UNKNOWN")
    else:
        assert resp.status_code == 200
        assert resp.content == image.manifest
        assert resp.headers["content-type"] == OCI_MANIFEST


# --- unknown manifests --------------------------------------------------------------------


def test_unknown_tag(client: httpx.Client, repo: str) -> None:
    push_image(client, repo, "exists")
    assert_error(
        client.get(f"/v2/{repo}/manifests/missing", headers={"Accept": ACCEPT_ALL}), 404, "MANIFEST_UNKNOWN"
    )
    assert client.head(f"/v2/{repo}/manifests/missing").status_code == 404


def test_unknown_digest(client: httpx.Client, repo: str) -> None:
    push_image(client, repo, "exists")
    resp = client.get(f"/v2/{repo}/manifests/{sha256(b'nothing')}", headers={"Accept": ACCEPT_ALL})
    assert_error(resp, 404, "MANIFEST_UNKNOWN")


def test_unknown_repository(client: httpx.Client) -> None:
    resp = client.get(f"/v2/{unique_repo()}/manifests/latest", headers={"Accept": ACCEPT_ALL})
    assert_error(resp, 404, ("NAME_UNKNOWN", "MANIFEST_UNKNOWN"))


def test_manifest_of_another_repository_is_invisible(client: httpx.Client, repo: str) -> None:
    image = push_image(client, repo, "v1")
    other = unique_repo()
    push_image(client, other, "v1")
    resp = client.get(f"/v2/{other}/manifests/{image.digest}", headers={"Accept": ACCEPT_ALL})
    assert_error(resp, 404, "MANIFEST_UNKNOWN")


# --- validation ---------------------------------------------------------------------------


_NO_SCHEMA_CHECK = distribution_deviates("2.8 does not validate the manifest schema (500 or blob errors)")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json at all", id="garbage"),
        pytest.param(b'{"schemaVersion": 2, "mediaType": ', id="truncated"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'"a string"', id="string"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe\x00 not utf-8", id="not-utf8"),
        pytest.param(
            b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}',
            id="no-config",
            marks=_NO_SCHEMA_CHECK,
        ),
        pytest.param(
            b'{"schemaVersion": 1, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}',
            id="schema1",
            marks=_NO_SCHEMA_CHECK,
        ),
        pytest.param(
            b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",'
            b' "config": {"mediaType": "x/y", "digest": "sha256:nothex", "size": 2}, "layers": []}',
            id="bad-digest",
            marks=_NO_SCHEMA_CHECK,
        ),
        pytest.param(
            b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",'
            b' "config": "not an object", "layers": []}',
            id="config-string",
        ),
    ],
)
def test_invalid_manifest(client: httpx.Client, repo: str, body: bytes) -> None:
    resp = put_manifest(client, repo, "bad", body, OCI_MANIFEST)
    assert_error(
        resp, 400, ("MANIFEST_INVALID", "DIGEST_INVALID") if b"nothex" in body else "MANIFEST_INVALID"
    )
    assert client.get(f"/v2/{repo}/manifests/bad", headers={"Accept": ACCEPT_ALL}).status_code == 404


def test_invalid_index(client: httpx.Client, repo: str) -> None:
    body = encode({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": "nope"})
    assert_error(put_manifest(client, repo, "bad", body, OCI_INDEX), 400, "MANIFEST_INVALID")


def test_missing_layer_blob(client: httpx.Client, repo: str) -> None:
    layer = descriptor(OCI_LAYER, random_bytes(50))  # never pushed
    body = encode(image_manifest(config_descriptor(client, repo), [layer]))
    assert_error(put_manifest(client, repo, "v1", body, OCI_MANIFEST), 400, "MANIFEST_BLOB_UNKNOWN")
    assert client.get(f"/v2/{repo}/manifests/v1", headers={"Accept": ACCEPT_ALL}).status_code == 404


def test_missing_config_blob(client: httpx.Client, repo: str) -> None:
    push_blob(client, repo, b"repo exists")
    body = encode(image_manifest(descriptor(OCI_CONFIG, b'{"never": "pushed"}'), []))
    assert_error(put_manifest(client, repo, "v1", body, OCI_MANIFEST), 400, "MANIFEST_BLOB_UNKNOWN")


def test_layer_only_in_another_repository(client: httpx.Client, repo: str) -> None:
    """The blob exists in the registry, but not in this repository."""
    data = random_bytes(50)
    push_blob(client, unique_repo(), data)
    body = encode(image_manifest(config_descriptor(client, repo), [descriptor(OCI_LAYER, data)]))
    assert_error(put_manifest(client, repo, "v1", body, OCI_MANIFEST), 400, "MANIFEST_BLOB_UNKNOWN")


def test_missing_index_child(client: httpx.Client, repo: str) -> None:
    """The spec: a manifest rejected for referencing unknown manifests or blobs MUST give
    MANIFEST_BLOB_UNKNOWN."""
    present = push_image(client, repo, None)
    absent = descriptor(OCI_MANIFEST, b'{"schemaVersion": 2}')
    body = encode(index_manifest([present.descriptor(), absent]))
    assert_error(put_manifest(client, repo, "multi", body, OCI_INDEX), 400, "MANIFEST_BLOB_UNKNOWN")


def test_index_child_only_in_another_repository(client: httpx.Client, repo: str) -> None:
    elsewhere = push_image(client, unique_repo(), None)
    push_blob(client, repo, b"repo exists")
    body = encode(index_manifest([elsewhere.descriptor()]))
    assert_error(put_manifest(client, repo, "multi", body, OCI_INDEX), 400, "MANIFEST_BLOB_UNKNOWN")


def test_content_type_differs_from_media_type(client: httpx.Client, repo: str) -> None:
    body = encode(image_manifest(config_descriptor(client, repo), []))  # mediaType: OCI manifest
    assert_error(put_manifest(client, repo, "v1", body, OCI_INDEX), 400, "MANIFEST_INVALID")
    assert_error(put_manifest(client, repo, "v1", body, DOCKER_MANIFEST), 400, "MANIFEST_INVALID")


def test_index_sent_as_image_manifest(client: httpx.Client, repo: str) -> None:
    child = push_image(client, repo, None)
    body = encode(index_manifest([child.descriptor()]))
    assert_error(put_manifest(client, repo, "v1", body, OCI_MANIFEST), 400, "MANIFEST_INVALID")


@distribution_deviates(
    "2.8 accepts any Content-Type it cannot parse as a schema1 manifest and says 400 later"
)
def test_unknown_content_type(client: httpx.Client, repo: str) -> None:
    body = encode(image_manifest(config_descriptor(client, repo), []))
    resp = put_manifest(client, repo, "v1", body, "application/x-not-a-manifest")
    assert_error(resp, (400, 415), ("MANIFEST_INVALID", "UNSUPPORTED"))


# --- subject -------------------------------------------------------------------------------


@distribution_deviates("2.8 knows no subject field and sends no OCI-Subject header")
def test_subject_pointing_to_a_missing_manifest(client: httpx.Client, repo: str) -> None:
    ghost = descriptor(OCI_MANIFEST, b'{"not": "pushed"}')
    body = encode(
        image_manifest(
            descriptor(OCI_EMPTY, EMPTY_CONFIG),
            [],
            artifact_type="application/vnd.example.sig.v1",
            subject=ghost,
        )
    )
    push_blob(client, repo, EMPTY_CONFIG)
    resp = put_manifest(client, repo, sha256(body), body, OCI_MANIFEST)
    assert resp.status_code == 201, resp.text
    assert resp.headers["oci-subject"] == ghost["digest"]


@distribution_deviates("2.8 knows no subject field and sends no OCI-Subject header")
def test_subject_pointing_to_an_existing_manifest(client: httpx.Client, repo: str) -> None:
    subject = push_image(client, repo, "v1")
    push_blob(client, repo, EMPTY_CONFIG)
    body = encode(
        image_manifest(
            descriptor(OCI_EMPTY, EMPTY_CONFIG),
            [],
            artifact_type="application/x.sig",
            subject=subject.descriptor(),
        )
    )
    resp = put_manifest(client, repo, "sig", body, OCI_MANIFEST)
    assert resp.status_code == 201
    assert resp.headers["oci-subject"] == subject.digest


# --- size limit ----------------------------------------------------------------------------


def padded_manifest(client: httpx.Client, repo: str, size: int) -> bytes:
    """A valid image manifest of exactly ``size`` bytes (padded with an annotation)."""
    config = config_descriptor(client, repo)
    bare = encode(image_manifest(config, [], annotations={"pad": ""}))
    body = encode(image_manifest(config, [], annotations={"pad": "x" * (size - len(bare))}))
    assert len(body) == size
    return body


def test_manifest_of_4_mib_is_accepted(client: httpx.Client, repo: str) -> None:
    body = padded_manifest(client, repo, 4 * MIB)
    resp = put_manifest(client, repo, "big", body, OCI_MANIFEST)
    assert resp.status_code == 201, resp.text[:300]
    assert client.get(f"/v2/{repo}/manifests/big", headers={"Accept": OCI_MANIFEST}).content == body


@distribution_deviates("2.8 has no manifest size limit")
def test_manifest_over_4_mib_is_rejected(client: httpx.Client, repo: str) -> None:
    body = padded_manifest(client, repo, 4 * MIB + 1)
    resp = put_manifest(client, repo, "too-big", body, OCI_MANIFEST)
    # The spec names only the status (413); the code is the registry's choice.
    assert_error(resp, 413, ("SIZE_INVALID", "MANIFEST_INVALID"))
    assert client.get(f"/v2/{repo}/manifests/too-big", headers={"Accept": ACCEPT_ALL}).status_code == 404


# --- push by digest --------------------------------------------------------------------------


def test_put_by_digest(client: httpx.Client, repo: str) -> None:
    image = push_image(client, repo, None)
    assert_manifest(client, image, image.digest)


def test_put_by_wrong_digest(client: httpx.Client, repo: str) -> None:
    body = encode(image_manifest(config_descriptor(client, repo), []))
    wrong = sha256(body + b" ")
    assert_error(put_manifest(client, repo, wrong, body, OCI_MANIFEST), 400, "DIGEST_INVALID")
    for reference in (wrong, sha256(body)):
        resp = client.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT_ALL})
        assert_error(resp, 404, "MANIFEST_UNKNOWN")


@distribution_deviates("2.8 answers a sha512 manifest reference with the sha256 digest")
def test_put_by_sha512_digest(client: httpx.Client, repo: str) -> None:
    body = encode(image_manifest(config_descriptor(client, repo), []))
    digest = sha512(body)
    resp = put_manifest(client, repo, digest, body, OCI_MANIFEST)
    assert resp.status_code == 201, resp.text
    assert resp.headers["docker-content-digest"] == digest
    got = client.get(f"/v2/{repo}/manifests/{digest}", headers={"Accept": OCI_MANIFEST})
    assert got.status_code == 200
    assert got.content == body


@distribution_deviates("2.8 ignores ?tag= (distribution-spec main, pushing multiple tags)")
def test_put_by_digest_with_several_tags(client: httpx.Client, repo: str) -> None:
    body = encode(image_manifest(config_descriptor(client, repo), []))
    digest = sha256(body)
    tags = ["v1", "v1.2", "latest"]
    resp = put_manifest(client, repo, digest, body, OCI_MANIFEST, params=[("tag", t) for t in tags])
    assert resp.status_code == 201, resp.text
    assert resp.headers["docker-content-digest"] == digest
    announced = {t.strip() for value in resp.headers.get_list("oci-tag") for t in value.split(",")}
    assert announced == set(tags)
    image = Image(repo=repo, manifest=body, media_type=OCI_MANIFEST)
    for tag in tags:
        assert_manifest(client, image, tag)


@distribution_deviates("2.8 ignores ?tag= (distribution-spec main, pushing multiple tags)")
def test_put_by_digest_with_an_invalid_tag(client: httpx.Client, repo: str) -> None:
    body = encode(image_manifest(config_descriptor(client, repo), []))
    resp = put_manifest(
        client, repo, sha256(body), body, OCI_MANIFEST, params=[("tag", "ok"), ("tag", "-bad")]
    )
    assert_error(resp, 400, ("TAG_INVALID", "MANIFEST_INVALID"))
