"""podman and buildah (private vfs storage, plain HTTP) against the registry."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.support.clients import ContainersStorage, describe, get_blob, get_manifest
from tests.support.oci_layout import OCI_MANIFEST, build_image, sha256_digest, write_oci_layout
from tests.support.servers import RegistryProcess

pytestmark = pytest.mark.e2e


def test_podman_push_pull(
    registry: RegistryProcess, containers_storage: ContainersStorage, tmp_path: Path, repo_name
) -> None:
    podman = containers_storage.podman
    image = build_image((200_000, 80_000))
    layout = write_oci_layout(tmp_path / "layout", {"v1": image})
    repo = repo_name()
    remote = f"{registry.host}/{repo}:v1"

    podman("pull", f"oci:{layout}:v1")
    image_id = image.config.digest.removeprefix("sha256:")  # podman's image ID is the config digest
    assert json.loads(podman("image", "inspect", image_id).stdout)[0]["Id"] == image_id

    digest_file = tmp_path / "digest"
    podman("push", "--tls-verify=false", "--digestfile", str(digest_file), image_id, f"docker://{remote}")
    digest = digest_file.read_text().strip()
    response = get_manifest(registry.url, repo, "v1")
    assert response.status_code == 200, describe(response)
    assert response.headers.get("docker-content-digest") == digest, describe(response)
    assert sha256_digest(response.content) == digest
    manifest = response.json()
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"]["digest"] == image.config.digest
    # podman stores layers uncompressed and recompresses them to push: same content, new digests.
    assert len(manifest["layers"]) == len(image.layers)
    for descriptor, layer in zip(manifest["layers"], image.layers, strict=True):
        blob = get_blob(registry.url, repo, descriptor["digest"])
        assert sha256_digest(blob) == descriptor["digest"]
        assert len(blob) == descriptor["size"]
        assert gzip.decompress(blob) == layer.tar

    # Pull it back into an emptied store, by tag and by digest.
    podman("rmi", "--all", "--force")
    assert podman("image", "exists", image_id, check=False).returncode != 0
    podman("pull", "--tls-verify=false", remote)
    inspected = json.loads(podman("image", "inspect", remote).stdout)[0]
    assert inspected["Id"] == image_id
    assert inspected["Digest"] == digest
    assert inspected["RootFS"]["Layers"] == [layer.diff_id for layer in image.layers]

    podman("rmi", "--all", "--force")
    by_digest = f"{registry.host}/{repo}@{digest}"
    podman("pull", "--tls-verify=false", by_digest)
    inspected = json.loads(podman("image", "inspect", by_digest).stdout)[0]
    assert inspected["Id"] == image_id
    assert by_digest in inspected["RepoDigests"]


def test_buildah_from_scratch_push(
    registry: RegistryProcess, containers_storage: ContainersStorage, tmp_path: Path, repo_name
) -> None:
    buildah, podman = containers_storage.buildah, containers_storage.podman
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"cargohold buildah e2e " + tmp_path.name.encode() + bytes(range(256)) * 400)
    container = buildah("from", "scratch").stdout.strip()
    buildah("copy", container, str(payload), "/payload.bin")
    buildah("config", "--label", "org.cargohold.test=buildah", "--cmd", "/payload.bin", container)
    local = f"localhost/e2e-buildah:{tmp_path.name.lower()}"
    buildah("commit", "--format", "oci", container, local)
    buildah("rm", container)

    repo = repo_name()
    remote = f"{registry.host}/{repo}:built"
    digest_file = tmp_path / "digest"
    buildah("push", "--tls-verify=false", "--digestfile", str(digest_file), local, f"docker://{remote}")
    digest = digest_file.read_text().strip()

    response = get_manifest(registry.url, repo, "built")
    assert response.status_code == 200, describe(response)
    assert sha256_digest(response.content) == digest
    manifest = response.json()
    config = json.loads(get_blob(registry.url, repo, manifest["config"]["digest"]))
    assert config["config"]["Labels"]["org.cargohold.test"] == "buildah"
    assert len(manifest["layers"]) == 1

    # podman (same storage) pulls it back after the local copy is removed.
    podman("rmi", "--all", "--force")
    podman("pull", "--tls-verify=false", remote)
    inspected = json.loads(podman("image", "inspect", remote).stdout)[0]
    assert inspected["Digest"] == digest
    assert inspected["Labels"]["org.cargohold.test"] == "buildah"
