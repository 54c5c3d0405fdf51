"""The pull-through cache: repositories under a prefix mirror an upstream registry.

``dockerhub/library/alpine`` here is ``library/alpine`` on the upstream configured for the
prefix ``dockerhub`` (after its ``repository_prefix``). Pulls are answered from the engine
when it has the content. On a miss the upstream is asked, and what it sends is stored
through the engine, digests verified before anything becomes visible, then served:

- a manifest by digest: fetched once, immutable from then on;
- a manifest by tag: fetched on a miss; once the cached tag is older than the upstream's
  ``tag_ttl`` the upstream is asked again (HEAD) and the tag moves if its digest changed.
  An upstream that cannot answer leaves the cached tag as it is, served, and asked again
  after another TTL. A tag the upstream no longer has stays cached too (retention and
  deletes remove it here);
- an index: its child manifests are fetched and stored with it (children first);
- blobs: stored with the manifest still to come (``lazy_blobs``, as Distribution's proxy
  does) and fetched on their first GET, streamed into the engine while the same bytes go
  to the client (``cache_fill``). A HEAD of a blob not fetched yet is answered from the
  upstream's HEAD, without fetching.

A blob another repository of this registry already holds is linked instead of fetched,
but only once the upstream has shown that it serves that blob in this repository: the
cache never hands out bytes its upstream would not.

Validation times are kept per process: after a restart each tag is asked about once more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import httpx

from cargohold.config import CacheSettings, CacheUpstream
from cargohold.engine import BlobInfo, BlobReader, Manifest, Registry
from cargohold.engine.digests import is_digest
from cargohold.engine.errors import (
    BlobUnknown,
    Denied,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    ReadOnly,
    StorageUnavailable,
    UpstreamUnavailable,
)
from cargohold.engine.manifests import parse_manifest
from cargohold.engine.names import check_tag
from cargohold.engine.pullthrough import namespace_of
from cargohold.replication.auth import AuthFailed
from cargohold.replication.cache_fill import BlobFills
from cargohold.replication.client import RegistryClient, RemoteError, RemoteManifest
from cargohold.replication.copier import KeyedLocks

log = logging.getLogger(__name__)

UPSTREAM_ERRORS = (httpx.HTTPError, RemoteError, AuthFailed)
T = TypeVar("T")
MAX_INDEX_DEPTH = 4  # indexes of indexes of ... stop somewhere
MAX_REFERRERS = 1000  # referrers of one subject fetched per refresh


@dataclass(frozen=True)
class Route:
    """Where a repository of a cache namespace lives upstream."""

    upstream: CacheUpstream
    client: RegistryClient
    repository: str  # the name on the upstream

    def call(self, request: Callable[..., T], *args: str) -> T:
        """One request to the upstream; whatever keeps it from answering is UpstreamUnavailable."""
        try:
            return request(*args)
        except UPSTREAM_ERRORS as exc:
            raise self.unavailable(exc) from exc

    def unavailable(self, exc: BaseException) -> UpstreamUnavailable:
        log.warning("upstream %s of the cache %s/: %s", self.upstream.url, self.upstream.prefix, exc)
        return UpstreamUnavailable(
            f"the upstream registry of {self.upstream.prefix}/ is unavailable or refused the request",
            detail={"repository": self.repository},
        )


class PullThroughCache:
    """Implements ``engine.pullthrough.PullThrough`` over the engine and upstream clients."""

    def __init__(
        self, registry: Registry, settings: CacheSettings, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.registry = registry
        self.upstreams = {upstream.prefix: upstream for upstream in settings.upstreams}
        self.clients = {
            upstream.prefix: RegistryClient(
                upstream.url,
                username=upstream.username,
                password=upstream.secret(),
                tls_verify=upstream.tls_verify,
                timeout=upstream.timeout,
                transport=transport,
            )
            for upstream in settings.upstreams
        }
        self.blobs = BlobFills(registry)
        self._manifest_locks = KeyedLocks()
        self._validated: dict[tuple[str, str], float] = {}  # (repository, tag) -> monotonic time

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def covers(self, repository: str) -> bool:
        return namespace_of(repository, self.upstreams) is not None

    def route(self, repository: str) -> Route:
        prefix = namespace_of(repository, self.upstreams)
        if prefix is None:
            raise NameUnknown(detail={"name": repository})
        upstream = self.upstreams[prefix]
        name = upstream.repository_prefix + repository[len(prefix) + 1 :]
        return Route(upstream, self.clients[prefix], name)

    # -- manifests --------------------------------------------------------------------------
    def get_manifest(self, repository: str, reference: str, with_data: bool = True) -> Manifest:
        if is_digest(reference):
            if self._local_digest(repository, reference) is None:
                with self._manifest_locks.hold((repository, reference)):
                    if self._local_digest(repository, reference) is None:
                        self._fetch(self.route(repository), repository, reference, None)
        else:
            self._refresh_tag(repository, check_tag(reference))
        return self.registry.get_manifest(repository, reference, with_data)

    def _refresh_tag(self, repository: str, tag: str) -> None:
        route = self.route(repository)
        if self._local_digest(repository, tag) is not None and self._fresh(route, repository, tag):
            return
        with self._manifest_locks.hold((repository, tag)):
            local = self._local_digest(repository, tag)
            if local is not None and self._fresh(route, repository, tag):
                return  # another request asked the upstream while this one waited
            try:
                self._ask_upstream(route, repository, tag, local)
            except (StorageUnavailable, ManifestUnknown, Denied):  # Denied: an immutable tag here
                if local is None:
                    raise
                log.warning("cannot revalidate %s:%s; serving the cached %s", repository, tag, local)
            self._validated[(repository, tag)] = time.monotonic()

    def _ask_upstream(self, route: Route, repository: str, tag: str, local: str | None) -> None:
        """Fetch the tag if it is not here, or move it if the upstream's digest changed."""
        if local is None:
            self._fetch(route, repository, tag, tag)
            return
        current = route.call(route.client.manifest_digest, route.repository, tag)
        if current is None:
            raise ManifestUnknown(detail={"reference": tag})  # gone upstream: the cached one stays
        if current != local:
            self._fetch(route, repository, current, tag)

    def _fresh(self, route: Route, repository: str, tag: str) -> bool:
        checked = self._validated.get((repository, tag))
        return checked is not None and time.monotonic() - checked < route.upstream.tag_ttl

    def _local_digest(self, repository: str, reference: str) -> str | None:
        try:
            return self.registry.get_manifest(
                repository, reference, with_data=False, record_pull=False
            ).digest
        except (ManifestUnknown, NameUnknown):
            return None

    def _fetch(self, route: Route, repository: str, reference: str, tag: str | None) -> None:
        """Fetch a manifest (verified against ``reference`` if that is a digest) and store it,
        tagged ``tag``; upstream failures are UpstreamUnavailable, an unknown one 404."""
        remote = route.call(route.client.manifest, route.repository, reference)
        if remote is None:
            raise ManifestUnknown(detail={"reference": reference})
        self._store(route, repository, remote, tag, MAX_INDEX_DEPTH)

    def _store(
        self, route: Route, repository: str, remote: RemoteManifest, tag: str | None, depth: int
    ) -> None:
        try:
            parsed = parse_manifest(remote.data, remote.media_type)
        except ManifestInvalid as exc:
            raise route.unavailable(exc) from exc
        for child in parsed.children:  # children first: the engine takes an index only after them
            if depth > 0 and self._local_digest(repository, child.digest) is None:
                fetched = route.call(route.client.manifest, route.repository, child.digest)
                if fetched is None:
                    raise route.unavailable(ValueError(f"its index lists {child.digest}, which it lacks"))
                self._store(route, repository, fetched, None, depth - 1)
        try:
            with _storing():
                self.registry.put_manifest(
                    repository, tag or remote.digest, remote.data, remote.media_type, lazy_blobs=True
                )
        except (ManifestInvalid, ManifestBlobUnknown, DigestInvalid) as exc:  # the upstream's fault
            raise route.unavailable(exc) from exc
        log.info(
            "cached %s@%s%s from %s",
            repository,
            remote.digest,
            f" as {tag}" if tag else "",
            route.upstream.url,
        )

    # -- referrers ----------------------------------------------------------------------------
    def refresh_referrers(self, repository: str, digest: str) -> None:
        """Bring the upstream's referrers of ``digest`` (signatures, SBOMs, attestations) here,
        at most once per ``tag_ttl``: each is an ordinary manifest naming ``digest`` as its
        subject, stored by digest. An upstream that is down or has no referrers API leaves
        what is cached; the referrers answer itself always comes from this registry."""
        if not is_digest(digest):
            return  # the engine answers the bad request
        route = self.route(repository)
        key = (repository, f"referrers:{digest}")  # ":" is in no tag: no clash with tag checks
        checked = self._validated.get(key)
        if checked is not None and time.monotonic() - checked < route.upstream.tag_ttl:
            return
        try:
            found = route.call(route.client.referrers, route.repository, digest) or []
            for descriptor in found[:MAX_REFERRERS]:
                referrer = descriptor.get("digest")
                if not isinstance(referrer, str) or not is_digest(referrer):
                    continue
                with self._manifest_locks.hold((repository, referrer)):
                    if self._local_digest(repository, referrer) is None:
                        self._fetch(route, repository, referrer, None)
        except (StorageUnavailable, ManifestUnknown, Denied) as exc:
            log.warning("referrers of %s@%s not refreshed from the upstream: %s", repository, digest, exc)
        self._validated[key] = time.monotonic()

    # -- blobs ------------------------------------------------------------------------------
    def stat_blob(self, repository: str, digest: str) -> BlobInfo:
        try:
            return self.registry.stat_blob(repository, digest)
        except BlobUnknown:
            pass
        route = self.route(repository)
        size = route.call(route.client.blob_size, route.repository, digest)
        if size is None:
            raise BlobUnknown(detail={"digest": digest})
        try:  # the upstream has it in this repository: a copy stored here may be linked
            return self.registry.mount_blob(repository, digest, None) or BlobInfo(digest, size)
        except (ReadOnly, Denied):  # no write now (maintenance, a full quota): the upstream's answer
            return BlobInfo(digest, size)

    def open_blob(self, repository: str, digest: str) -> BlobReader:
        try:
            return self.registry.open_blob(repository, digest)
        except BlobUnknown:
            pass
        route = self.route(repository)
        with _storing():
            return self.blobs.open(
                repository, digest, lambda: route.call(route.client.open_blob, route.repository, digest)
            )


@contextmanager
def _storing() -> Iterator[None]:
    """The cache's writes: in read-only mode nothing new can be cached, which a puller should
    hear as "try again later" (503), not as a refused push (405)."""
    try:
        yield
    except ReadOnly as exc:
        raise StorageUnavailable("the registry is in read-only mode: nothing new can be cached now") from exc
