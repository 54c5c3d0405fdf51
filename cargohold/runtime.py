"""Builds the running pieces (backend, metadata store, engine, ASGI app) from settings."""

from __future__ import annotations

from cargohold.backends import Backend, FilesystemBackend
from cargohold.config import Settings, load_settings
from cargohold.engine import MetadataStore, Registry, RegistryLimits


def open_backend(settings: Settings) -> Backend:
    if settings.storage.backend == "filesystem":
        return FilesystemBackend(settings.blob_root)
    raise ValueError(f"unknown storage backend {settings.storage.backend!r}")


def open_registry(settings: Settings) -> Registry:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    limits = RegistryLimits(
        upload_expiry_seconds=settings.uploads.expiry_hours * 3600,
        manifest_max_bytes=settings.limits.manifest_max_bytes,
        delete_enabled=settings.delete_enabled,
    )
    return Registry(MetadataStore(settings.metadata_path), open_backend(settings), limits)


def create_asgi_app(settings: Settings | None = None):  # type: ignore[no-untyped-def]
    """The ASGI app for one worker process (the ASGI server calls this as a factory)."""
    from cargohold.api import create_app
    from cargohold.logs import configure_logging

    settings = settings or load_settings()
    configure_logging(settings.log_level)
    registry = open_registry(settings)
    return create_app(
        registry,
        catalog_max_n=settings.limits.catalog_max_n,
        tags_max_n=settings.limits.tags_max_n,
        referrers_page_size=settings.limits.referrers_page_size,
        chunk_min_length=settings.uploads.chunk_min_length,
        log_format=settings.log_format,
    )
