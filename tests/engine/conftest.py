from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cargohold.backends import FilesystemBackend
from cargohold.engine import MetadataStore, Registry, RegistryLimits


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def push_blob(registry: Registry, repository: str, data: bytes, parts: int = 1) -> str:
    upload = registry.start_upload(repository)
    step = max(1, len(data) // parts)
    pieces = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
    for piece in pieces[:-1]:
        registry.append_upload(repository, upload.id, [piece])
    return registry.finish_upload(repository, upload.id, digest_of(data), [pieces[-1]]).digest


def image_manifest(config: bytes, layers: list[bytes], **extra: object) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest_of(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest_of(x),
                "size": len(x),
            }
            for x in layers
        ],
        **extra,
    }
    return json.dumps(doc).encode()


def push_image(registry: Registry, repository: str, tag: str, config: bytes, layers: list[bytes]) -> str:
    for blob in [config, *layers]:
        push_blob(registry, repository, blob)
    manifest = image_manifest(config, layers)
    return registry.put_manifest(
        repository, tag, manifest, "application/vnd.oci.image.manifest.v1+json"
    ).digest


def make_registry(root: Path, **limits: object) -> Registry:
    return Registry(
        MetadataStore(root / "metadata.db"), FilesystemBackend(root / "blobs"), RegistryLimits(**limits)
    )


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return make_registry(tmp_path)
