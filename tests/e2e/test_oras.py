"""ORAS (Python SDK) artifacts with an ``artifactType``, referrers with a ``subject``, and the
OCI 1.1 referrers API (``GET /v2/<name>/referrers/<digest>``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import oras.oci
import oras.provider
import pytest

from tests.support.clients import describe, get_blob, get_manifest, target_kind
from tests.support.oci_layout import OCI_EMPTY, OCI_INDEX, OCI_MANIFEST, Blob, sha256_digest
from tests.support.servers import RegistryProcess

pytestmark = pytest.mark.e2e

ARTIFACT_TYPE = "application/vnd.cargohold.test.bundle.v1"
SBOM_TYPE = "application/vnd.cargohold.test.sbom.v1+json"
SIGNATURE_TYPE = "application/vnd.cargohold.test.signature.v1"
LEGACY_TYPE = "application/vnd.cargohold.test.legacy.config.v1+json"
EMPTY_CONFIG = Blob(OCI_EMPTY, b"{}")


def oras_client(registry: RegistryProcess) -> oras.provider.Registry:
    return oras.provider.Registry(hostname=registry.host, insecure=True, auth_backend="basic")


def upload_artifact(
    client: oras.provider.Registry,
    tmp_path: Path,
    repo_ref: str,
    artifact_type: str,
    files: dict[str, bytes],
    subject: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Upload ``files`` as layers plus the empty config; return the artifact manifest to PUT."""
    container = client.get_container(repo_ref)
    layers = []
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        layer = oras.oci.NewLayer(str(path), media_type=f"{artifact_type}.layer", is_dir=False)
        layer["annotations"] = {"org.opencontainers.image.title": name}
        response = client.upload_blob(str(path), container, layer)
        assert response.status_code in (200, 201), response.text
        layers.append(layer)
    config_path = tmp_path / "empty.json"
    config_path.write_bytes(EMPTY_CONFIG.data)
    response = client.upload_blob(str(config_path), container, EMPTY_CONFIG.descriptor())
    assert response.status_code in (200, 201), response.text
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": EMPTY_CONFIG.descriptor(),
        "layers": layers,
        "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    }
    if subject is not None:
        manifest["subject"] = subject
    return manifest


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """What oras sends for ``upload_manifest(manifest)`` (requests' ``json=``: default json.dumps)."""
    return json.dumps(manifest).encode()


def put_manifest(client: oras.provider.Registry, ref: str, manifest: dict[str, Any]) -> str:
    """PUT ``manifest`` at ``ref`` (``host/repo:tag`` or ``host/repo@digest``); return its digest."""
    digest = sha256_digest(manifest_bytes(manifest))
    response = client.upload_manifest(manifest, client.get_container(ref))
    request = f"PUT {response.request.url} ({response.request.headers.get('Content-Type')})"
    assert response.status_code == 201, f"{request} -> {response.status_code}: {response.text}"
    assert response.headers.get("Docker-Content-Digest") == digest, f"{request}: {dict(response.headers)}"
    if "subject" in manifest and target_kind() != "distribution":
        # OCI distribution spec 1.1: a registry with the referrers API answers OCI-Subject.
        assert response.headers.get("OCI-Subject") == manifest["subject"]["digest"], (
            f"{request}: {dict(response.headers)}"
        )
    return digest


def test_oras_artifact_push_pull(registry: RegistryProcess, tmp_path: Path, repo_name) -> None:
    client = oras_client(registry)
    repo = repo_name()
    files = {"model.bin": b"\x00\x01weights" * 20_000, "README.txt": b"cargohold e2e artifact\n"}
    manifest = upload_artifact(client, tmp_path, f"{registry.host}/{repo}", ARTIFACT_TYPE, files)
    digest = put_manifest(client, f"{registry.host}/{repo}:v1", manifest)

    response = get_manifest(registry.url, repo, "v1")
    assert response.status_code == 200, describe(response)
    assert response.headers.get("docker-content-digest") == digest, describe(response)
    assert response.headers["content-type"].split(";")[0] == OCI_MANIFEST, describe(response)
    assert response.json()["artifactType"] == ARTIFACT_TYPE

    # oras pull writes each layer under its title annotation.
    out = tmp_path / "pulled"
    pulled = client.pull(target=f"{registry.host}/{repo}:v1", outdir=str(out))
    assert sorted(Path(p).name for p in pulled) == sorted(files)
    for name, content in files.items():
        assert (out / name).read_bytes() == content
    assert client.get_tags(f"{registry.host}/{repo}") == ["v1"]


def test_referrers_api(registry: RegistryProcess, tmp_path: Path, repo_name) -> None:
    client = oras_client(registry)
    repo = repo_name()
    app = upload_artifact(
        client, tmp_path, f"{registry.host}/{repo}", ARTIFACT_TYPE, {"app.bin": b"app" * 10_000}
    )
    subject_digest = put_manifest(client, f"{registry.host}/{repo}:app", app)
    subject = {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": len(manifest_bytes(app))}

    # Referrers are pushed by digest (no tag), as ORAS and cosign do.
    referrers: dict[str, tuple[dict[str, Any], str]] = {}
    for artifact_type, name in [
        (SBOM_TYPE, "sbom.json"),
        (SIGNATURE_TYPE, "sig.bin"),
        (SBOM_TYPE, "sbom2.json"),
    ]:
        files = {name: f"{name} for {subject_digest}".encode()}
        manifest = upload_artifact(client, tmp_path, f"{registry.host}/{repo}", artifact_type, files, subject)
        ref = f"{registry.host}/{repo}@{sha256_digest(manifest_bytes(manifest))}"
        referrers[put_manifest(client, ref, manifest)] = (manifest, artifact_type)
    # An older-style referrer without artifactType: its type is the config's media type.
    legacy = upload_artifact(
        client, tmp_path, f"{registry.host}/{repo}", LEGACY_TYPE, {"old.txt": b"old"}, subject
    )
    del legacy["artifactType"]
    legacy["config"] = {**legacy["config"], "mediaType": LEGACY_TYPE}
    ref = f"{registry.host}/{repo}@{sha256_digest(manifest_bytes(legacy))}"
    referrers[put_manifest(client, ref, legacy)] = (legacy, LEGACY_TYPE)

    # The referrer manifests are stored as pushed (by digest, no tag).
    for digest in referrers:
        response = get_manifest(registry.url, repo, digest)
        assert response.status_code == 200, describe(response)
        assert response.json()["subject"]["digest"] == subject_digest
    # The subject is untouched.
    assert sha256_digest(get_manifest(registry.url, repo, "app").content) == subject_digest
    assert get_blob(registry.url, repo, EMPTY_CONFIG.digest) == b"{}"

    if target_kind() == "distribution":
        # CNCF Distribution 2.8 predates OCI 1.1 and has no referrers API; CI runs against cargohold.
        return

    url = f"{registry.url}/v2/{repo}/referrers/{subject_digest}"
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, describe(response)
    assert response.headers["content-type"].split(";")[0] == OCI_INDEX, describe(response)
    index = response.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX, index
    found = {d["digest"]: d for d in index["manifests"]}
    assert set(found) == set(referrers), describe(response)
    for digest, (manifest, artifact_type) in referrers.items():
        descriptor = found[digest]
        assert descriptor["mediaType"] == OCI_MANIFEST, descriptor
        # artifactType, else the config's media type (OCI distribution spec 1.1).
        assert descriptor["artifactType"] == artifact_type, descriptor
        assert descriptor["size"] == len(manifest_bytes(manifest)), descriptor
        assert descriptor.get("annotations") == manifest["annotations"], descriptor

    filtered = httpx.get(url, params={"artifactType": SBOM_TYPE}, timeout=30)
    assert filtered.status_code == 200, describe(filtered)
    assert filtered.headers.get("oci-filters-applied") == "artifactType", describe(filtered)
    sboms = {d["digest"] for d in filtered.json()["manifests"]}
    assert sboms == {d for d, (_, t) in referrers.items() if t == SBOM_TYPE}, describe(filtered)
    assert all(d["artifactType"] == SBOM_TYPE for d in filtered.json()["manifests"])

    none = httpx.get(url, params={"artifactType": "application/vnd.cargohold.nothing"}, timeout=30)
    assert none.status_code == 200, describe(none)
    assert none.json()["manifests"] == [], describe(none)

    # A digest that nothing refers to (here: a referrer itself) has an empty list, not a 404.
    some_referrer = next(iter(referrers))
    empty = httpx.get(f"{registry.url}/v2/{repo}/referrers/{some_referrer}", timeout=30)
    assert empty.status_code == 200, describe(empty)
    assert empty.json()["manifests"] == [], describe(empty)

    # Deleting a referrer removes it from the list.
    deleted = httpx.delete(f"{registry.url}/v2/{repo}/manifests/{some_referrer}", timeout=30)
    assert deleted.status_code == 202, describe(deleted)
    after = httpx.get(url, timeout=30)
    remaining = {d["digest"] for d in after.json()["manifests"]}
    assert remaining == set(referrers) - {some_referrer}, describe(after)
