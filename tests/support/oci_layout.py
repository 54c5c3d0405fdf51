"""Build container images on disk from Python, for end-to-end tests without internet.

- :func:`build_image` makes a single-platform image: random-content ``tar.gz`` layers, a
  config JSON whose ``rootfs.diff_ids`` match the uncompressed layers, and an OCI image
  manifest (or a Docker schema 2 one) with correct digests and sizes.
- :func:`build_index` wraps several images into a multi-arch image index.
- :func:`write_oci_layout` writes an OCI image layout (``oci-layout``, ``index.json``,
  ``blobs/sha256/...``) that ``skopeo copy oci:DIR:TAG ...`` or ``podman pull oci:DIR:TAG``
  read; :func:`read_oci_layout` reads one back (e.g. after ``skopeo copy ... oci:DIR:TAG``).
- :func:`write_oci_archive` writes the same layout as a single tar file.
- :func:`write_docker_archive` writes a ``docker save``-style tarball for ``docker load``.

Layer contents come from ``os.urandom``, so every image built is unique: its blobs are
never already present in a registry from an earlier test.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_LAYOUT = "application/vnd.oci.layout.header.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REF_NAME = "org.opencontainers.image.ref.name"

#: The media types a client sends in ``Accept`` to get any kind of manifest back unchanged.
ALL_MANIFEST_TYPES = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])

FIXED_TIME = "2024-01-01T00:00:00Z"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Blob:
    """Some bytes with their media type: a layer, a config or a manifest."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass(frozen=True)
class Layer:
    """A filesystem layer: the uncompressed tar (whose digest is the diff ID) and its gzip."""

    tar: bytes
    blob: Blob  # the gzip-compressed tar, as stored in a registry

    @property
    def diff_id(self) -> str:
        return sha256_digest(self.tar)

    @property
    def digest(self) -> str:
        return self.blob.digest


@dataclass(frozen=True)
class Image:
    """A single-platform image: layers, config and manifest."""

    layers: list[Layer]
    config: Blob
    manifest: Blob
    platform: dict[str, str]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def blobs(self) -> list[Blob]:
        return [self.config, *(layer.blob for layer in self.layers), self.manifest]


@dataclass(frozen=True)
class Index:
    """A multi-arch image index over several images."""

    images: list[Image]
    index: Blob

    @property
    def digest(self) -> str:
        return self.index.digest

    @property
    def manifest(self) -> Blob:
        return self.index

    def blobs(self) -> list[Blob]:
        return [blob for image in self.images for blob in image.blobs()] + [self.index]


def make_layer_tar(size: int, *, name: str = "payload.bin") -> bytes:
    """An uncompressed tar holding a directory and one file of ``size`` random bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("data")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        directory.mtime = 1_700_000_000
        tar.addfile(directory)
        content = os.urandom(size)
        member = tarfile.TarInfo(f"data/{name}")
        member.size = len(content)
        member.mode = 0o644
        member.mtime = 1_700_000_000
        tar.addfile(member, io.BytesIO(content))
    return buf.getvalue()


def make_layer(size: int, *, name: str = "payload.bin", media_type: str = OCI_LAYER_GZIP) -> Layer:
    tar = make_layer_tar(size, name=name)
    return Layer(tar=tar, blob=Blob(media_type, gzip.compress(tar, compresslevel=1, mtime=0)))


def build_image(
    layer_sizes: Sequence[int] = (200_000, 100_000),
    *,
    architecture: str = "amd64",
    os_name: str = "linux",
    variant: str | None = None,
    docker: bool = False,
    labels: Mapping[str, str] | None = None,
) -> Image:
    """A random image with one layer per entry of ``layer_sizes`` (bytes of random content).

    ``docker=True`` gives a Docker schema 2 manifest with Docker media types instead of OCI.
    """
    layer_type, config_type, manifest_type = (
        (DOCKER_LAYER_GZIP, DOCKER_CONFIG, DOCKER_MANIFEST)
        if docker
        else (OCI_LAYER_GZIP, OCI_CONFIG, OCI_MANIFEST)
    )
    layers = [
        make_layer(size, name=f"layer{i}-{architecture}.bin", media_type=layer_type)
        for i, size in enumerate(layer_sizes)
    ]
    platform = {"architecture": architecture, "os": os_name}
    if variant:
        platform["variant"] = variant
    config_doc: dict[str, Any] = {
        "created": FIXED_TIME,
        **platform,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/data/payload"],
            "Labels": {"org.cargohold.test": "e2e", **(labels or {})},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": FIXED_TIME, "created_by": f"cargohold test layer {i}"} for i in range(len(layers))
        ],
    }
    config = Blob(config_type, canonical_json(config_doc))
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": [layer.blob.descriptor() for layer in layers],
    }
    return Image(
        layers=layers,
        config=config,
        manifest=Blob(manifest_type, canonical_json(manifest_doc)),
        platform=platform,
    )


def build_index(images: Sequence[Image] | None = None, *, layer_sizes: Sequence[int] = (100_000,)) -> Index:
    """An OCI image index; by default over two fresh images, linux/amd64 and linux/arm64/v8."""
    if images is None:
        images = [
            build_image(layer_sizes, architecture="amd64"),
            build_image(layer_sizes, architecture="arm64", variant="v8"),
        ]
    index_doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [image.manifest.descriptor(platform=image.platform) for image in images],
    }
    return Index(images=list(images), index=Blob(OCI_INDEX, canonical_json(index_doc)))


def write_oci_layout(path: Path, tags: Mapping[str, Image | Index]) -> Path:
    """Write an OCI image layout at ``path`` holding each target under its tag (ref name)."""
    blob_dir = path / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for tag, target in tags.items():
        for blob in target.blobs():
            (blob_dir / blob.digest.removeprefix("sha256:")).write_bytes(blob.data)
        entries.append(target.manifest.descriptor(annotations={REF_NAME: tag}))
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (path / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    )
    return path


def write_oci_archive(path: Path, tags: Mapping[str, Image | Index]) -> Path:
    """The same OCI image layout as one tar file (``oci-archive:``, ``ctr images import``)."""
    with tempfile.TemporaryDirectory() as tmp:
        layout = write_oci_layout(Path(tmp), tags)
        with tarfile.open(path, mode="w") as tar:
            for member in sorted(layout.rglob("*")):
                tar.add(member, arcname=str(member.relative_to(layout)), recursive=False)
    return path


@dataclass
class LayoutContents:
    """What an OCI image layout on disk holds: ``index.json`` entries by tag, and blobs."""

    path: Path
    refs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def blob(self, digest: str) -> bytes:
        algorithm, hexdigest = digest.split(":", 1)
        data = (self.path / "blobs" / algorithm / hexdigest).read_bytes()
        assert sha256_digest(data) == digest, f"blob {digest} in {self.path} does not match its digest"
        return data

    def manifest(self, tag: str) -> Blob:
        descriptor = self.refs[tag]
        return Blob(descriptor["mediaType"], self.blob(descriptor["digest"]))


def read_oci_layout(path: Path) -> LayoutContents:
    layout = json.loads((path / "oci-layout").read_text())
    assert layout.get("imageLayoutVersion") == "1.0.0", layout
    index = json.loads((path / "index.json").read_text())
    contents = LayoutContents(path)
    for entry in index["manifests"]:
        tag = (entry.get("annotations") or {}).get(REF_NAME, entry["digest"])
        contents.refs[tag] = entry
    return contents


def write_docker_archive(path: Path, image: Image, repo_tags: Sequence[str]) -> Path:
    """Write a ``docker save``-style tarball of ``image`` (for ``docker load -i``).

    Layers go in uncompressed, as ``docker save`` writes them; the config is stored
    unchanged, so the loaded image's ID is ``image.config.digest``.
    """
    config_name = image.config.digest.removeprefix("sha256:") + ".json"
    layer_names = [f"{layer.diff_id.removeprefix('sha256:')}/layer.tar" for layer in image.layers]
    manifest = [{"Config": config_name, "RepoTags": list(repo_tags), "Layers": layer_names}]

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 1_700_000_000
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, mode="w") as tar:
        add(tar, config_name, image.config.data)
        for name, layer in zip(layer_names, image.layers, strict=True):
            add(tar, name, layer.tar)
        add(tar, "manifest.json", json.dumps(manifest).encode())
    return path
