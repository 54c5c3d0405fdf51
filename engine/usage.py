"""Storage accounting from the refcounts: a query, never a scan of the store."""

from __future__ import annotations

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


@dataclass(frozen=True)
class Usage:
    blobs: int
    stored_bytes: int  # physical: each digest once
    repositories: list[RepositoryUsage] = field(default_factory=list)

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
        }


def measure(store: MetadataStore) -> Usage:
    queries = JobQueries(store)
    conn = store.read()
    blobs, stored = queries.store_usage(conn)
    repositories = [RepositoryUsage(*row) for row in queries.repository_usage(conn)]
    return Usage(blobs, stored, repositories)
