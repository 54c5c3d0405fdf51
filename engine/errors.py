"""Registry errors, one class per OCI error code.

The engine raises these; the API turns them into the OCI error JSON with the HTTP
status from its one table (``cargohold.api.errors``). ``detail`` is optional
structured context that is safe to show the client.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RegistryError(Exception):
    code: ClassVar[str] = "UNKNOWN"
    default_message: ClassVar[str] = "unknown error"

    def __init__(self, message: str | None = None, detail: Any = None) -> None:
        self.message = message or self.default_message
        self.detail = detail
        super().__init__(self.message)


class BlobUnknown(RegistryError):
    code = "BLOB_UNKNOWN"
    default_message = "blob unknown to registry"


class BlobUploadInvalid(RegistryError):
    code = "BLOB_UPLOAD_INVALID"
    default_message = "blob upload invalid"


class BlobUploadUnknown(RegistryError):
    code = "BLOB_UPLOAD_UNKNOWN"
    default_message = "blob upload unknown to registry"


class DigestInvalid(RegistryError):
    code = "DIGEST_INVALID"
    default_message = "provided digest did not match uploaded content"


class ManifestBlobUnknown(RegistryError):
    code = "MANIFEST_BLOB_UNKNOWN"
    default_message = "manifest references a manifest or blob unknown to registry"


class ManifestInvalid(RegistryError):
    code = "MANIFEST_INVALID"
    default_message = "manifest invalid"


class ManifestTooLarge(ManifestInvalid):
    """Same code as MANIFEST_INVALID; the API answers it with 413."""

    default_message = "manifest too large"


class ManifestUnknown(RegistryError):
    code = "MANIFEST_UNKNOWN"
    default_message = "manifest unknown to registry"


class NameInvalid(RegistryError):
    code = "NAME_INVALID"
    default_message = "invalid repository name"


class NameUnknown(RegistryError):
    code = "NAME_UNKNOWN"
    default_message = "repository name not known to registry"


class SizeInvalid(RegistryError):
    code = "SIZE_INVALID"
    default_message = "provided length did not match content length"


class Unsupported(RegistryError):
    code = "UNSUPPORTED"
    default_message = "the operation is unsupported"


class Denied(RegistryError):
    code = "DENIED"
    default_message = "requested access to the resource is denied"


class TagImmutable(Denied):
    """An immutable tag would move or go, or the manifest it names would go (403 DENIED)."""

    default_message = "the tag is immutable"


class QuotaExceeded(Denied):
    """The push would take a namespace over its storage quota (403 DENIED)."""

    default_message = "storage quota exceeded"


class TooManyRequests(RegistryError):
    code = "TOOMANYREQUESTS"
    default_message = "too many requests"


class RangeInvalid(RegistryError):
    """A chunk or a read range that does not fit; carries what the client needs to resume."""

    code = "RANGE_INVALID"
    default_message = "invalid content range"

    def __init__(self, message: str | None = None, *, size: int, upload_offset: int | None = None) -> None:
        super().__init__(message)
        self.size = size
        self.upload_offset = upload_offset


class UploadBusy(RangeInvalid):
    """Another request is writing to the same upload session right now."""

    default_message = "another request is writing to this upload session"


class StorageUnavailable(RegistryError):
    """The backend or the metadata store cannot be reached (503)."""

    code = "UNAVAILABLE"
    default_message = "storage is temporarily unavailable"


class PaginationInvalid(Unsupported):
    """``n`` or ``last`` cannot be used (answered with 400)."""

    default_message = "invalid pagination parameters"


class EndpointUnknown(Unsupported):
    """No such route under /v2/ (answered with 404)."""

    default_message = "unknown endpoint"


class DeletesDisabled(Unsupported):
    """Deletes are turned off in the configuration (answered with 405)."""

    default_message = "deletes are disabled on this registry"


class ReadOnly(Unsupported):
    """The registry is in read-only mode (maintenance, restore): writes answer 405."""

    default_message = "the registry is in read-only mode for maintenance; reads still work"


class UpstreamUnavailable(StorageUnavailable):
    """A pull-through cache could not get content from its upstream registry (503)."""

    default_message = "the upstream registry of this pull-through cache is unavailable"
