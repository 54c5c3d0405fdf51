"""The blob engine: content-addressed blobs, manifests, tags and upload sessions over a backend."""

from cargohold.engine.errors import RegistryError
from cargohold.engine.metadata import MetadataStore
from cargohold.engine.registry import (
    BlobInfo,
    BlobReader,
    Manifest,
    Page,
    PutManifestResult,
    Registry,
    RegistryLimits,
    UploadState,
)

__all__ = [
    "BlobInfo",
    "BlobReader",
    "Manifest",
    "MetadataStore",
    "Page",
    "PutManifestResult",
    "Registry",
    "RegistryError",
    "RegistryLimits",
    "UploadState",
]
