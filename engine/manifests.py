"""Manifest parsing and validation: what a manifest references, and whether it is well formed.

The bytes are never re-serialized: the registry stores and serves exactly what the
client sent, and the digest is computed over those bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cargohold.engine.digests import parse_digest
from cargohold.engine.errors import ManifestInvalid

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = IMAGE_TYPES | INDEX_TYPES
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
# Layers that are legitimately not stored in a registry (Windows base layers and the like).
_NONDISTRIBUTABLE = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None


@dataclass
class ParsedManifest:
    media_type: str
    artifact_type: str | None
    subject: str | None
    annotations: dict[str, str] | None
    blobs: list[Descriptor] = field(default_factory=list)
    children: list[Descriptor] = field(default_factory=list)


def _base_media_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise ManifestInvalid(f"{where}: a descriptor must be an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestInvalid(f"{where}: mediaType is required")
    if not isinstance(digest, str):
        raise ManifestInvalid(f"{where}: digest is required")
    parse_digest(digest)  # DIGEST_INVALID is not right here: the manifest is what is invalid
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ManifestInvalid(f"{where}: size must be a non-negative integer")
    artifact_type = value.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestInvalid(f"{where}: artifactType must be a string")
    annotations = _annotations(value.get("annotations"), where)
    return Descriptor(media_type, digest, size, artifact_type, annotations)


def _annotations(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ManifestInvalid(f"{where}: annotations must map strings to strings")
    return value


def _descriptor_list(doc: dict[str, Any], key: str, required: bool) -> list[Descriptor]:
    value = doc.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise ManifestInvalid(f"{key} must be a list")
    return [_descriptor(item, f"{key}[{i}]") for i, item in enumerate(value)]


def parse_manifest(data: bytes, content_type: str | None) -> ParsedManifest:
    """Validate ``data`` as a manifest of a supported type; raise ManifestInvalid if it is not."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestInvalid(f"manifest is not valid JSON: {exc}") from None
    except RecursionError:
        raise ManifestInvalid("manifest JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest must be a JSON object")

    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid("mediaType must be a string")
    header_type = _base_media_type(content_type)
    if header_type in DOCKER_SCHEMA1 or declared in DOCKER_SCHEMA1:
        raise ManifestInvalid("Docker schema 1 manifests are not supported")
    if header_type and header_type not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest Content-Type {header_type!r}")
    if declared and header_type and header_type != declared:
        raise ManifestInvalid(f"Content-Type {header_type} does not match mediaType {declared}")
    media_type = declared or (header_type if header_type in MANIFEST_TYPES else None)
    if media_type is None:
        # An OCI manifest may omit mediaType; its shape says what it is.
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST if "config" in doc else None
    if media_type not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {media_type or header_type!r}")
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalid("schemaVersion must be 2")

    artifact_type = doc.get("artifactType")
    if artifact_type is not None and (not isinstance(artifact_type, str) or not artifact_type):
        raise ManifestInvalid("artifactType must be a non-empty string")
    subject = doc.get("subject")
    subject_digest = _descriptor(subject, "subject").digest if subject is not None else None
    annotations = _annotations(doc.get("annotations"), "annotations")
    parsed = ParsedManifest(media_type, artifact_type, subject_digest, annotations)

    if media_type in IMAGE_TYPES:
        if "manifests" in doc:
            raise ManifestInvalid("an image manifest has no 'manifests' field")
        config = _descriptor(doc.get("config"), "config")
        layers = _descriptor_list(doc, "layers", required=media_type == DOCKER_MANIFEST)
        # Referrers list an image by its artifactType, or failing that its config type.
        parsed.artifact_type = artifact_type or config.media_type
        parsed.blobs = [config, *(layer for layer in layers if layer.media_type not in _NONDISTRIBUTABLE)]
    else:
        if "config" in doc or "layers" in doc:
            raise ManifestInvalid("an index has no 'config' or 'layers' field")
        parsed.children = _descriptor_list(doc, "manifests", required=True)
    return parsed
