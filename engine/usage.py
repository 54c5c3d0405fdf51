"""Storage accounting from the refcounts: a query, never a scan of the store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cargohold.engine.metadata import MetadataStore
from cargohold.engine.metadata_jobs import JobQueries


@dataclass(frozen=True, slots=True)
class RepositoryUsage:
    name: str
    blobs: int
    referenced_bytes: int  # every blob the repository may serve
    unique_bytes: int  # what deleting the repository (and a GC) would free

    @property
    def shared_bytes(self) -> int:
        return self.referenced_bytes - self.unique_bytes


@dataclass(frozen=True, slots=True)
class QuotaUse:
    """A storage quota and its use, deduplicated within its namespace (``engine.quotas``)."""

    repositories: str
    limit_bytes: int
    used_bytes: int
    objects: int  # distinct blobs and manifests counted
    warned: bool  # past the warning mark (its event was sent)

    def as_dict(self) -> dict[str, Any]:
        share = 100.0 * self.used_bytes / self.limit_bytes if self.limit_bytes else 100.0
        return {**asdict(self), "used_percent": round(share, 1)}


@dataclass(frozen=True)
class Usage:
    blobs: int
    stored_bytes: int  # physical: each digest once
    repositories: list[RepositoryUsage] = field(default_factory=list)
    quotas: list[QuotaUse] = field(default_factory=list)

    @property
    def logical_bytes(self) -> int:
        """What the repositories would take without dedup."""
        return sum(repo.referenced_bytes for repo in self.repositories)

    @property
    def dedup_savings_bytes(self) -> int:
        return max(0, self.logical_bytes - self.stored_bytes)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape the CLI and the admin API both print."""
        return {
            "blobs": self.blobs,
            "stored_bytes": self.stored_bytes,
            "logical_bytes": self.logical_bytes,
            "dedup_savings_bytes": self.dedup_savings_bytes,
            "repositories": [
                {**asdict(repo), "shared_bytes": repo.shared_bytes} for repo in self.repositories
            ],
            "quotas": [quota.as_dict() for quota in self.quotas],
        }


def measure(store: MetadataStore, quotas: Sequence[QuotaUse] = ()) -> Usage:
    queries = JobQueries(store)
    conn = store.read()
    blobs, stored = queries.store_usage(conn)
    repositories = [RepositoryUsage(*row) for row in queries.repository_usage(conn)]
    return Usage(blobs, stored, repositories, list(quotas))


def human_size(count: float) -> str:
    """``1.5 GiB`` rather than ``1610612736``, for people (the CLI, error messages)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"
