"""The docker CLI with a private dockerd (20.10), and containerd's ``ctr``, against the registry:
load, tag, push, pull by tag and by digest, multi-arch indexes."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from tests.support.clients import DockerDaemon, Skopeo, describe, get_blob, get_manifest
from tests.support.oci_layout import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_INDEX,
    build_image,
    build_index,
    sha256_digest,
    write_docker_archive,
    write_oci_archive,
    write_oci_layout,
)
from tests.support.servers import RegistryProcess

pytestmark = pytest.mark.e2e

CTR_CONTENT_READ_FLAKE = "failed to copy: rpc error: code = Internal desc = unexpected EOF"
PUSHED = re.compile(r"(\S+): digest: (sha256:[0-9a-f]{64}) size: (\d+)")


def test_docker_load_push_pull(
    registry: RegistryProcess, docker_daemon: DockerDaemon, tmp_path: Path, repo_name
) -> None:
    docker = docker_daemon
    image = build_image((200_000, 100_000), docker=True)
    local = f"cargohold-e2e/{tmp_path.name.lower()}:v1"
    archive = write_docker_archive(tmp_path / "image.tar", image, [local])
    repo = repo_name()
    remote = f"{registry.host}/{repo}:v1"

    loaded = docker("load", "-i", str(archive))
    assert local in loaded.stdout, loaded.stdout
    image_id = docker("image", "inspect", "--format", "{{.Id}}", local).stdout.strip()
    assert image_id == image.config.digest

    docker("tag", local, remote)
    pushed = docker("push", remote)
    match = PUSHED.search(pushed.stdout)
    assert match, pushed.stdout
    tag, digest, size = match.group(1), match.group(2), int(match.group(3))
    assert tag == "v1"

    # What the registry holds is what docker says it pushed.
    response = get_manifest(registry.url, repo, "v1")
    assert response.status_code == 200, describe(response)
    assert response.headers["content-type"].split(";")[0] == DOCKER_MANIFEST, describe(response)
    assert response.headers.get("docker-content-digest") == digest, describe(response)
    assert sha256_digest(response.content) == digest
    assert len(response.content) == size
    manifest = response.json()
    assert manifest["config"] == {
        "mediaType": DOCKER_CONFIG,
        "size": image.config.size,
        "digest": image.config.digest,
    }
    assert get_blob(registry.url, repo, image.config.digest) == image.config.data
    # docker recompresses the layers it pushes; each one must decompress to the original diff.
    assert len(manifest["layers"]) == len(image.layers)
    for descriptor, layer in zip(manifest["layers"], image.layers, strict=True):
        assert descriptor["mediaType"] == DOCKER_LAYER_GZIP
        blob = get_blob(registry.url, repo, descriptor["digest"])
        assert sha256_digest(blob) == descriptor["digest"]
        assert len(blob) == descriptor["size"]
        assert gzip.decompress(blob) == layer.tar

    # Pull by tag into an empty image store.
    docker("rmi", local, remote)
    assert docker("image", "inspect", remote, check=False).returncode != 0
    docker("pull", remote)
    inspected = json.loads(docker("image", "inspect", remote).stdout)[0]
    assert inspected["Id"] == image.config.digest
    assert f"{registry.host}/{repo}@{digest}" in inspected["RepoDigests"]
    assert inspected["RootFS"]["Layers"] == [layer.diff_id for layer in image.layers]

    # Pull by digest.
    docker("rmi", remote)
    by_digest = f"{registry.host}/{repo}@{digest}"
    pulled = docker("pull", by_digest)
    assert digest in pulled.stdout, pulled.stdout
    inspected = json.loads(docker("image", "inspect", by_digest).stdout)[0]
    assert inspected["Id"] == image.config.digest
    docker("rmi", by_digest)


def test_docker_push_second_tag_reuses_layers(
    registry: RegistryProcess, docker_daemon: DockerDaemon, tmp_path: Path, repo_name
) -> None:
    """Pushing the same image to a second repository mounts every layer from the first."""
    docker = docker_daemon
    image = build_image((150_000,), docker=True)
    local = f"cargohold-e2e/{tmp_path.name.lower()}:v1"
    docker("load", "-i", str(write_docker_archive(tmp_path / "image.tar", image, [local])))
    first_repo, second_repo = repo_name("first"), repo_name("second")
    first, second = f"{registry.host}/{first_repo}:v1", f"{registry.host}/{second_repo}:v1"
    docker("tag", local, first)
    docker("tag", local, second)
    digest_first = PUSHED.search(docker("push", first).stdout)
    out = docker("push", second).stdout
    digest_second = PUSHED.search(out)
    assert digest_first and digest_second, out
    assert digest_first.group(2) == digest_second.group(2)
    # The blob was never linked to the second repository, so docker must mount it there
    # (POST ...?mount=&from=) rather than find it already present or upload it again.
    assert re.findall(r"^\w+: Mounted from (\S+)$", out, re.M) == [first_repo] * len(image.layers), out
    assert not re.search(r"^\w+: (Pushed|Layer already exists)", out, re.M), out
    response = get_manifest(registry.url, second_repo, "v1")
    assert response.status_code == 200, describe(response)
    assert sha256_digest(response.content) == digest_first.group(2)
    docker("rmi", local, first, second)


def test_docker_pull_multi_arch_index(
    registry: RegistryProcess, docker_daemon: DockerDaemon, skopeo: Skopeo, tmp_path: Path, repo_name
) -> None:
    """docker resolves an OCI image index pushed by skopeo to its linux/amd64 image."""
    index = build_index()
    src = write_oci_layout(tmp_path / "src", {"multi": index})
    repo = repo_name()
    skopeo.copy(f"oci:{src}:multi", f"docker://{registry.host}/{repo}:multi", "--all", "--preserve-digests")
    amd64 = next(image for image in index.images if image.platform["architecture"] == "amd64")

    remote = f"{registry.host}/{repo}:multi"
    pulled = docker_daemon("pull", "--platform", "linux/amd64", remote)
    assert index.digest in pulled.stdout, pulled.stdout
    inspected = json.loads(docker_daemon("image", "inspect", remote).stdout)[0]
    assert inspected["Id"] == amd64.config.digest
    assert inspected["Architecture"] == "amd64"
    assert f"{registry.host}/{repo}@{index.digest}" in inspected["RepoDigests"]
    docker_daemon("rmi", remote)


def test_containerd_ctr_push_pull_all_platforms(
    registry: RegistryProcess, docker_daemon: DockerDaemon, tmp_path: Path, repo_name
) -> None:
    """containerd's resolver and pusher (HEAD before PUT, OCI media types) with a multi-arch index."""
    index = build_index()
    archive = write_oci_archive(tmp_path / "multi.tar", {"multi": index})
    namespace = f"e2e-{tmp_path.name.lower()[-20:]}"
    ctr = docker_daemon.ctr
    local = "localhost/e2e/multi:multi"
    ctr(
        namespace,
        "images",
        "import",
        "--all-platforms",
        "--no-unpack",
        "--base-name",
        "localhost/e2e/multi",
        str(archive),
    )
    repo = repo_name()
    remote = f"{registry.host}/{repo}:multi"
    for _attempt in range(3):
        pushed = ctr(namespace, "images", "push", "--plain-http", remote, local, check=False)
        # ctr 1.6 now and then fails mid-push reading its *own* content store over gRPC
        # (containerd/containerd#5734; about 1 push in 20 here, against Distribution too): retry that only.
        if pushed.returncode == 0 or CTR_CONTENT_READ_FLAKE not in pushed.stderr:
            break
    assert pushed.returncode == 0, f"ctr images push failed:\n{pushed.stdout[-3000:]}\n{pushed.stderr}"

    response = get_manifest(registry.url, repo, "multi")
    assert response.status_code == 200, describe(response)
    assert response.content == index.index.data, describe(response)
    assert response.headers["content-type"].split(";")[0] == OCI_INDEX, describe(response)

    # Remove the image and its content, so that the pull has to fetch every blob.
    ctr(namespace, "images", "rm", local)
    digests = [blob.digest for blob in index.blobs()]
    ctr(namespace, "content", "rm", *digests)
    assert ctr(namespace, "content", "get", index.digest, check=False).returncode != 0
    ctr(namespace, "images", "pull", "--plain-http", "--all-platforms", "--snapshotter", "native", remote)
    listed = ctr(namespace, "images", "ls").stdout
    line = next(line for line in listed.splitlines() if line.startswith(remote + " "))
    assert index.digest in line and "linux/amd64" in line and "linux/arm64/v8" in line, listed
    for blob in index.blobs():
        fetched = docker_daemon.ctr_content(namespace, blob.digest)
        assert fetched == blob.data, f"{blob.digest} ({blob.media_type}) differs after ctr pull"
    ctr(namespace, "images", "rm", remote)
