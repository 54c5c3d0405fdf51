"""skopeo against the registry: OCI and Docker manifests, image indexes, cross-repository
mounts, tag listing and deletion. Images are built locally (tests/support/oci_layout.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support.clients import Skopeo, describe, get_blob, get_manifest, head_blob
from tests.support.oci_layout import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    build_image,
    build_index,
    read_oci_layout,
    sha256_digest,
    write_oci_layout,
)
from tests.support.servers import RegistryProcess

pytestmark = pytest.mark.e2e


def assert_manifest_served(
    registry: RegistryProcess, repo: str, ref: str, expected: bytes, media_type: str
) -> None:
    """GET the manifest by ``ref`` and by digest: same bytes, content type and digest header."""
    digest = sha256_digest(expected)
    for reference in (ref, digest):
        response = get_manifest(registry.url, repo, reference)
        assert response.status_code == 200, describe(response)
        assert response.content == expected, describe(response)
        assert response.headers["content-type"].split(";")[0] == media_type, describe(response)
        assert response.headers.get("docker-content-digest") == digest, describe(response)


def test_copy_multi_layer_image_roundtrip(
    registry: RegistryProcess, skopeo: Skopeo, tmp_path: Path, repo_name
) -> None:
    image = build_image((300_000, 150_000, 50_000))
    src = write_oci_layout(tmp_path / "src", {"v1": image})
    repo = repo_name()
    remote = f"docker://{registry.host}/{repo}:v1"

    skopeo.copy(f"oci:{src}:v1", remote, "--preserve-digests")

    raw = skopeo.inspect_raw(remote)
    assert sha256_digest(raw) == image.digest
    assert raw == image.manifest.data
    assert_manifest_served(registry, repo, "v1", image.manifest.data, OCI_MANIFEST)
    for blob in [image.config, *(layer.blob for layer in image.layers)]:
        head = head_blob(registry.url, repo, blob.digest)
        assert head.status_code == 200, describe(head)
        assert int(head.headers["content-length"]) == blob.size, describe(head)
        assert head.headers.get("docker-content-digest") == blob.digest, describe(head)
        assert get_blob(registry.url, repo, blob.digest) == blob.data

    # skopeo inspect (not raw) reports the layers in order and the platform from the config.
    info = json.loads(skopeo("inspect", "--tls-verify=false", remote).stdout)
    assert info["Digest"] == image.digest
    assert info["Layers"] == [layer.digest for layer in image.layers]
    assert info["Architecture"] == "amd64"
    assert info["Os"] == "linux"

    # And back: registry -> a new OCI layout, everything byte-identical.
    skopeo.copy(remote, f"oci:{tmp_path / 'back'}:v1", "--preserve-digests")
    back = read_oci_layout(tmp_path / "back")
    manifest = back.manifest("v1")
    assert manifest.digest == image.digest
    assert manifest.data == image.manifest.data
    assert back.blob(image.config.digest) == image.config.data
    doc = manifest.json()
    assert [layer["digest"] for layer in doc["layers"]] == [layer.digest for layer in image.layers]
    for layer in image.layers:
        assert back.blob(layer.digest) == layer.blob.data


def test_copy_all_multi_arch_index_roundtrip(
    registry: RegistryProcess, skopeo: Skopeo, tmp_path: Path, repo_name
) -> None:
    index = build_index()
    src = write_oci_layout(tmp_path / "src", {"multi": index})
    repo = repo_name()
    remote = f"docker://{registry.host}/{repo}:multi"

    skopeo.copy(f"oci:{src}:multi", remote, "--all", "--preserve-digests")

    raw = skopeo.inspect_raw(remote)
    assert sha256_digest(raw) == index.digest
    assert_manifest_served(registry, repo, "multi", index.index.data, OCI_INDEX)
    for image in index.images:
        # Each platform's manifest is reachable by digest, and its blobs are in the repository.
        child = skopeo.inspect_raw(f"docker://{registry.host}/{repo}@{image.digest}")
        assert child == image.manifest.data
        for layer in image.layers:
            head = head_blob(registry.url, repo, layer.digest)
            assert head.status_code == 200, describe(head)
    # A platform-specific inspect resolves through the index (its "Digest" is the index's).
    arm = json.loads(
        skopeo(
            "--override-arch", "arm64", "--override-variant", "v8", "inspect", "--tls-verify=false", remote
        ).stdout
    )
    assert arm["Digest"] == index.digest
    assert arm["Architecture"] == "arm64"
    assert arm["Layers"] == [layer.digest for layer in index.images[1].layers]

    skopeo.copy(remote, f"oci:{tmp_path / 'back'}:multi", "--all", "--preserve-digests")
    back = read_oci_layout(tmp_path / "back")
    assert back.refs["multi"]["digest"] == index.digest
    assert back.refs["multi"]["mediaType"] == OCI_INDEX
    assert back.manifest("multi").data == index.index.data
    for image in index.images:
        assert back.blob(image.digest) == image.manifest.data
        assert back.blob(image.config.digest) == image.config.data
        for layer in image.layers:
            assert back.blob(layer.digest) == layer.blob.data


POST_UPLOAD = re.compile(r"POST (\S*/v2/\S+/blobs/uploads/\S*)")


def assert_mounted_not_uploaded(log: str, repo_a: str, image: Image) -> None:
    """From ``skopeo --debug copy`` output: every layer of ``image`` was mounted from ``repo_a``
    (POST .../blobs/uploads/?from=<repo_a>&mount=<digest>) and no layer bytes were sent or read."""
    uploads = POST_UPLOAD.findall(log)
    upload_lines = "\n".join(line for line in log.splitlines() if "/blobs/uploads/" in line)
    mount_from = "from=" + quote(repo_a, safe="")
    for layer in image.layers:
        mounts = [url for url in uploads if "mount=" + quote(layer.digest, safe="") in url]
        assert mounts, f"no cross-repository mount for layer {layer.digest}:\n{upload_lines}"
        assert all(mount_from in url for url in mounts), mounts
    # A mount that the registry answers with 202 (a plain upload session) makes skopeo fall
    # back to POST + PATCH + PUT ?digest=. Only the small config blob may be uploaded that
    # way: skopeo always uploads the config itself.
    finished = {
        d.replace("%3A", ":") for d in re.findall(r"PUT \S*/blobs/uploads/\S*[?&]digest=([^&\s\"]+)", log)
    }
    assert finished <= {image.config.digest}, f"layer bytes were uploaded again:\n{upload_lines}"
    assert len(re.findall(r"PATCH \S*/blobs/uploads/", log)) <= len(finished), upload_lines
    for layer in image.layers:
        assert f"/blobs/{layer.digest}" not in "\n".join(re.findall(r"GET \S+", log)), (
            f"layer {layer.digest} was downloaded from the source instead of mounted"
        )


def test_copy_between_repositories_uses_cross_repo_mount(
    registry: RegistryProcess, skopeo: Skopeo, tmp_path: Path, repo_name
) -> None:
    image = build_image((250_000, 120_000))
    src = write_oci_layout(tmp_path / "src", {"t": image})
    repo_a, repo_b = repo_name("a"), repo_name("b")
    skopeo.copy(f"oci:{src}:t", f"docker://{registry.host}/{repo_a}:t", "--preserve-digests")
    for layer in image.layers:
        head = head_blob(registry.url, repo_b, layer.digest)
        assert head.status_code == 404, (
            "a blob is visible in a repository it was never linked to\n" + describe(head)
        )

    result = skopeo.copy(
        f"docker://{registry.host}/{repo_a}:t",
        f"docker://{registry.host}/{repo_b}:t",
        "--preserve-digests",
        debug=True,
    )
    assert_mounted_not_uploaded(result.stdout + result.stderr, repo_a, image)

    assert skopeo.inspect_raw(f"docker://{registry.host}/{repo_b}:t") == image.manifest.data
    for layer in image.layers:
        head = head_blob(registry.url, repo_b, layer.digest)
        assert head.status_code == 200, describe(head)
        assert get_blob(registry.url, repo_b, layer.digest) == layer.blob.data


def test_list_tags_and_delete(registry: RegistryProcess, skopeo: Skopeo, tmp_path: Path, repo_name) -> None:
    first, second = build_image((60_000,)), build_image((60_000,))
    src = write_oci_layout(tmp_path / "src", {"one": first, "two": second})
    repo = repo_name()
    base = f"docker://{registry.host}/{repo}"
    skopeo.copy(f"oci:{src}:one", f"{base}:one", "--preserve-digests")
    skopeo.copy(f"oci:{src}:one", f"{base}:also-one", "--preserve-digests")
    skopeo.copy(f"oci:{src}:two", f"{base}:two", "--preserve-digests")

    listed = json.loads(skopeo("list-tags", "--tls-verify=false", base).stdout)
    assert listed["Repository"] == f"{registry.host}/{repo}"
    assert sorted(listed["Tags"]) == ["also-one", "one", "two"]

    skopeo("delete", "--tls-verify=false", f"{base}@{first.digest}")

    for reference in (first.digest, "one", "also-one"):
        response = get_manifest(registry.url, repo, reference)
        assert response.status_code == 404, describe(response)
        assert response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN", describe(response)
    failed = skopeo("inspect", "--tls-verify=false", "--raw", f"{base}:one", check=False)
    assert failed.returncode != 0
    # The other image and its tag are untouched.
    assert skopeo.inspect_raw(f"{base}:two") == second.manifest.data
    listed = json.loads(skopeo("list-tags", "--tls-verify=false", base).stdout)
    assert listed["Tags"] == ["two"]

    # Deleting by tag resolves the tag and deletes that manifest.
    skopeo("delete", "--tls-verify=false", f"{base}:two")
    response = get_manifest(registry.url, repo, second.digest)
    assert response.status_code == 404, describe(response)


def test_push_docker_schema2_roundtrip(
    registry: RegistryProcess, skopeo: Skopeo, tmp_path: Path, repo_name
) -> None:
    image = build_image((180_000, 90_000))
    src = write_oci_layout(tmp_path / "src", {"v2": image})
    repo = repo_name()
    remote = f"docker://{registry.host}/{repo}:v2s2"
    digest_file = tmp_path / "digest"

    skopeo.copy(f"oci:{src}:v2", remote, "--format", "v2s2", "--digestfile", str(digest_file))

    raw = skopeo.inspect_raw(remote)
    pushed_digest = digest_file.read_text().strip()
    assert sha256_digest(raw) == pushed_digest
    assert pushed_digest != image.digest  # converted, so a different manifest
    doc = json.loads(raw)
    assert doc["schemaVersion"] == 2
    assert doc["mediaType"] == DOCKER_MANIFEST
    assert doc["config"]["mediaType"] == DOCKER_CONFIG
    assert [layer["mediaType"] for layer in doc["layers"]] == [DOCKER_LAYER_GZIP] * len(image.layers)
    # Compressed layers are copied unchanged; only their media type differs.
    assert [(layer["digest"], layer["size"]) for layer in doc["layers"]] == [
        (layer.digest, layer.blob.size) for layer in image.layers
    ]
    assert_manifest_served(registry, repo, "v2s2", raw, DOCKER_MANIFEST)
    config = get_blob(registry.url, repo, doc["config"]["digest"])
    assert sha256_digest(config) == doc["config"]["digest"]
    assert json.loads(config)["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]

    # Back out unchanged: the dir: transport keeps the manifest bytes as served.
    out = tmp_path / "back"
    skopeo.copy(remote, f"dir:{out}", "--preserve-digests")
    assert (out / "manifest.json").read_bytes() == raw
    for layer in image.layers:
        assert (out / layer.digest.removeprefix("sha256:")).read_bytes() == layer.blob.data
