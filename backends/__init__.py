"""Pluggable object stores behind one small interface (see ``base``)."""

from cargohold.backends.base import (
    Backend,
    BackendError,
    LocalPaths,
    ObjectInfo,
    ObjectNotFound,
    PresignedURLs,
    StagedBusy,
    StagedWriter,
)
from cargohold.backends.filesystem import FilesystemBackend

__all__ = [
    "Backend",
    "BackendError",
    "FilesystemBackend",
    "LocalPaths",
    "ObjectInfo",
    "ObjectNotFound",
    "PresignedURLs",
    "StagedBusy",
    "StagedWriter",
]
