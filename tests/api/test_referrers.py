"""GET /v2/<name>/referrers/<digest>: the referrers API of distribution-spec 1.1.

Distribution 2.8 has no referrers API at all, so the whole module is cargohold's."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.oci import (
    EMPTY_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    assert_error,
    descriptor,
    distribution_deviates,
    encode,
    image_manifest,
    index_manifest,
    next_link,
    push_blob,
    push_image,
    put_manifest,
    sha256,
    unique_repo,
)
from tests.support.servers import RegistryProcess

pytestmark = distribution_deviates("2.8 has no referrers API (404)")

SBOM = "application/vnd.example.sbom.v1+json"
SIG = "application/vnd.example.signature.v1+json"


def referrers(client: httpx.Client, repo: str, digest: str, **params: str) -> httpx.Response:
    resp = client.get(f"/v2/{repo}/referrers/{digest}", params=params)
    assert resp.status_code == 200, f"referrers of {digest}: {resp.status_code} {resp.text}"
    assert resp.headers["content-type"] == OCI_INDEX
    body = resp.json()
    assert body["schemaVersion"] == 2
    assert body["mediaType"] == OCI_INDEX
    assert isinstance(body["manifests"], list)
    return resp


def by_digest(resp: httpx.Response) -> dict[str, dict[str, Any]]:
    return {d["digest"]: d for d in resp.json()["manifests"]}


def push_artifact(
    client: httpx.Client,
    repo: str,
    subject: dict[str, Any],
    *,
    artifact_type: str | None = None,
    config_media_type: str | None = None,
    annotations: dict[str, str] | None = None,
    tag: str | None = None,
) -> Image:
    """Push a referrer (by digest unless ``tag``): an artifact with the empty config, or an
    image whose type shows only through its config media type."""
    if config_media_type:
        config = b'{"kind": "config"}'
        config_type = config_media_type
    else:
        config, config_type = EMPTY_CONFIG, OCI_EMPTY
    push_blob(client, repo, config)
    body = encode(
        image_manifest(
            descriptor(config_type, config),
            [],
            artifact_type=artifact_type,
            subject=subject,
            annotations=annotations,
        )
    )
    resp = put_manifest(client, repo, tag or sha256(body), body, OCI_MANIFEST)
    assert resp.status_code == 201, resp.text
    assert resp.headers.get("oci-subject") == subject["digest"]
    return Image(repo=repo, manifest=body, media_type=OCI_MANIFEST)


@pytest.fixture
def subject(client: httpx.Client, repo: str) -> Image:
    return push_image(client, repo, "v1")


def test_no_referrers_is_an_empty_index(client: httpx.Client, repo: str, subject: Image) -> None:
    resp = referrers(client, repo, subject.digest)
    assert resp.json()["manifests"] == []


def test_referrers_of_an_unknown_digest(client: httpx.Client, repo: str, subject: Image) -> None:
    resp = referrers(client, repo, sha256(b"no such manifest"))
    assert resp.json()["manifests"] == []


def test_referrer_descriptors(client: httpx.Client, repo: str, subject: Image) -> None:
    annotations = {"org.opencontainers.image.created": "2024-01-01T00:00:00Z", "org.example.format": "spdx"}
    sbom = push_artifact(client, repo, subject.descriptor(), artifact_type=SBOM, annotations=annotations)
    # No artifactType: the descriptor takes the config media type.
    signed = push_artifact(client, repo, subject.descriptor(), config_media_type=SIG)
    found = by_digest(referrers(client, repo, subject.digest))
    assert set(found) == {sbom.digest, signed.digest}
    assert found[sbom.digest] == {
        "mediaType": OCI_MANIFEST,
        "digest": sbom.digest,
        "size": len(sbom.manifest),
        "artifactType": SBOM,
        "annotations": annotations,
    }
    assert found[signed.digest]["artifactType"] == SIG
    assert found[signed.digest]["size"] == len(signed.manifest)
    assert found[signed.digest]["mediaType"] == OCI_MANIFEST
    assert not found[signed.digest].get("annotations")


def test_tagged_referrer_is_listed(client: httpx.Client, repo: str, subject: Image) -> None:
    tagged = push_artifact(client, repo, subject.descriptor(), artifact_type=SBOM, tag="sbom")
    assert tagged.digest in by_digest(referrers(client, repo, subject.digest))


def test_index_as_referrer(client: httpx.Client, repo: str, subject: Image) -> None:
    child = push_image(client, repo, None)
    body = encode(
        index_manifest(
            [child.descriptor()],
            artifact_type="application/vnd.example.bundle.v1",
            subject=subject.descriptor(),
            annotations={"k": "v"},
        )
    )
    resp = put_manifest(client, repo, sha256(body), body, OCI_INDEX)
    assert resp.status_code == 201
    assert resp.headers["oci-subject"] == subject.digest
    found = by_digest(referrers(client, repo, subject.digest))[sha256(body)]
    assert found["mediaType"] == OCI_INDEX
    assert found["artifactType"] == "application/vnd.example.bundle.v1"
    assert found["annotations"] == {"k": "v"}


def test_index_without_artifact_type_has_none(client: httpx.Client, repo: str, subject: Image) -> None:
    child = push_image(client, repo, None)
    body = encode(index_manifest([child.descriptor()], subject=subject.descriptor()))
    assert put_manifest(client, repo, sha256(body), body, OCI_INDEX).status_code == 201
    found = by_digest(referrers(client, repo, subject.digest))[sha256(body)]
    assert "artifactType" not in found


def test_referrer_pushed_before_its_subject(client: httpx.Client, repo: str) -> None:
    push_blob(client, repo, b"repo exists")
    future = descriptor(OCI_MANIFEST, b'{"pushed": "later"}')
    early = push_artifact(client, repo, future, artifact_type=SIG)
    assert early.digest in by_digest(referrers(client, repo, future["digest"]))


def test_artifact_type_filter(client: httpx.Client, repo: str, subject: Image) -> None:
    sbom = push_artifact(client, repo, subject.descriptor(), artifact_type=SBOM)
    push_artifact(client, repo, subject.descriptor(), artifact_type=SIG)
    resp = referrers(client, repo, subject.digest, artifactType=SBOM)
    assert resp.headers["oci-filters-applied"] == "artifactType"
    assert set(by_digest(resp)) == {sbom.digest}
    none = referrers(client, repo, subject.digest, artifactType="application/x-nothing")
    assert none.json()["manifests"] == []
    assert none.headers["oci-filters-applied"] == "artifactType"


def test_referrers_are_per_repository(client: httpx.Client, repo: str, subject: Image) -> None:
    push_artifact(client, repo, subject.descriptor(), artifact_type=SBOM)
    other = unique_repo()
    push_blob(client, other, b"other exists")
    assert referrers(client, other, subject.digest).json()["manifests"] == []


def test_deleted_referrer_disappears(client: httpx.Client, repo: str, subject: Image) -> None:
    gone = push_artifact(client, repo, subject.descriptor(), artifact_type=SBOM)
    kept = push_artifact(client, repo, subject.descriptor(), artifact_type=SIG)
    assert client.delete(f"/v2/{repo}/manifests/{gone.digest}").status_code == 202
    assert set(by_digest(referrers(client, repo, subject.digest))) == {kept.digest}


def test_invalid_digest(client: httpx.Client, repo: str, subject: Image) -> None:
    for bad in ("not-a-digest", "sha256:1234", "sha256:" + "Z" * 64):
        assert_error(client.get(f"/v2/{repo}/referrers/{bad}"), 400, "DIGEST_INVALID")


def test_tag_is_not_a_digest(client: httpx.Client, repo: str, subject: Image) -> None:
    assert_error(client.get(f"/v2/{repo}/referrers/v1"), 400, "DIGEST_INVALID")


def test_pagination(small_limits_registry: RegistryProcess) -> None:
    """With CARGOHOLD_LIMITS__REFERRERS_PAGE_SIZE=2, five referrers take three pages."""
    with httpx.Client(base_url=small_limits_registry.url, timeout=30.0) as client:
        repo = unique_repo()
        subject = push_image(client, repo, "v1")
        pushed = {
            push_artifact(
                client, repo, subject.descriptor(), artifact_type=SBOM, annotations={"i": str(i)}
            ).digest
            for i in range(5)
        }
        seen: list[str] = []
        url: str | None = f"/v2/{repo}/referrers/{subject.digest}"
        pages = 0
        while url:
            resp = client.get(url)
            assert resp.status_code == 200
            assert resp.headers["content-type"] == OCI_INDEX
            page = resp.json()
            assert page["mediaType"] == OCI_INDEX
            assert len(page["manifests"]) <= 2
            seen.extend(d["digest"] for d in page["manifests"])
            url = next_link(resp)
            pages += 1
            assert pages <= 5, "pagination does not end"
        assert pages == 3
        assert len(seen) == len(set(seen)) == 5
        assert set(seen) == pushed


def test_pagination_with_filter(small_limits_registry: RegistryProcess) -> None:
    with httpx.Client(base_url=small_limits_registry.url, timeout=30.0) as client:
        repo = unique_repo()
        subject = push_image(client, repo, "v1")
        wanted = set()
        for i in range(6):
            kind = SBOM if i % 2 else SIG
            pushed = push_artifact(
                client, repo, subject.descriptor(), artifact_type=kind, annotations={"i": str(i)}
            )
            if kind == SBOM:
                wanted.add(pushed.digest)
        seen: list[str] = []
        url: str | None = str(
            httpx.URL(f"/v2/{repo}/referrers/{subject.digest}", params={"artifactType": SBOM})
        )
        while url:
            resp = client.get(url)
            assert resp.status_code == 200
            assert resp.headers["oci-filters-applied"] == "artifactType"
            seen.extend(d["digest"] for d in resp.json()["manifests"])
            url = next_link(resp)
        assert len(seen) == len(set(seen))
        assert set(seen) == wanted
