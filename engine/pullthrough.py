"""Pull-through cache namespaces, as the engine and the API see them.

A namespace (a repository name prefix such as ``dockerhub``) may mirror an upstream
registry: a pull of something it lacks is fetched from the upstream, stored through this
engine and served. The fetching lives in ``cargohold.replication.cache``; the API reaches
it only through the ``PullThrough`` protocol below, so neither knows the other.

What the engine itself must know: a cached manifest is stored *before* its blobs (they
are fetched when a client first asks for them, as Distribution's proxy does), so in a
cache namespace a manifest reference to a blob that is not there yet is expected, not
damage (``fsck`` says nothing about it; a pull fetches it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from cargohold.engine.registry import BlobInfo, BlobReader, Manifest


def namespace_of(repository: str, prefixes: Iterable[str]) -> str | None:
    """The cache prefix ``repository`` lives under (the longest that matches), or None."""
    found = None
    for prefix in prefixes:
        if repository.startswith(prefix + "/") and (found is None or len(prefix) > len(found)):
            found = prefix
    return found


class PullThrough(Protocol):
    """The reads of cache namespaces: the same answers as the engine's own reads, with the
    upstream asked on a miss (and a tag asked again once its TTL has passed)."""

    def covers(self, repository: str) -> bool:
        """Whether ``repository`` is in a cache namespace (pushes there are refused)."""

    def get_manifest(self, repository: str, reference: str, with_data: bool = True) -> Manifest: ...

    def stat_blob(self, repository: str, digest: str) -> BlobInfo: ...

    def open_blob(self, repository: str, digest: str) -> BlobReader: ...

    def refresh_referrers(self, repository: str, digest: str) -> None:
        """Bring the upstream's referrers of ``digest`` here (at most once per TTL)."""
