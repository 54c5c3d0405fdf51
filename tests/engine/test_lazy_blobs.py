"""Manifests stored before their blobs (``lazy_blobs``, for the pull-through cache): the
refcounts stay exact when the blobs arrive later, fsck accepts the not-yet-fetched blobs
only in cache namespaces, and the GC treats such content like any other."""

from __future__ import annotations

from pathlib import Path

import pytest

from cargohold.engine import Registry
from cargohold.engine import errors as e
from cargohold.gc import collect
from tests.engine.conftest import digest_of, image_manifest, make_registry, push_blob

CONFIG, LAYER = b'{"lazy":true}', b"a layer fetched later" * 100
MANIFEST = image_manifest(CONFIG, [LAYER])
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def cache(tmp_path: Path) -> Registry:
    return make_registry(tmp_path, pull_through_prefixes=("mirror",))


def refcount(registry: Registry, data: bytes) -> tuple[int, int]:
    row = registry.store.read().execute(
        "SELECT manifest_refs, repo_links FROM blobs WHERE digest = ?", (digest_of(data),)
    )
    return tuple(row.fetchone())  # type: ignore[return-value]


def test_a_lazy_manifest_is_stored_without_its_blobs_and_counted_when_they_come(cache: Registry) -> None:
    with pytest.raises(e.ManifestBlobUnknown):  # the ordinary rule still holds
        cache.put_manifest("mirror/app", "v1", MANIFEST, OCI_MANIFEST)
    digest = cache.put_manifest("mirror/app", "v1", MANIFEST, OCI_MANIFEST, lazy_blobs=True).digest
    assert cache.get_manifest("mirror/app", "v1").digest == digest
    with pytest.raises(e.BlobUnknown):
        cache.stat_blob("mirror/app", digest_of(LAYER))
    assert cache.fsck().clean  # not fetched yet is not damage in a cache namespace

    push_blob(cache, "mirror/app", LAYER)  # what the cache does on the first GET
    push_blob(cache, "mirror/app", CONFIG)
    assert refcount(cache, LAYER) == (1, 1) and refcount(cache, CONFIG) == (1, 1)
    report = cache.fsck()
    assert report.clean and report.findings == []


def test_outside_a_cache_namespace_a_missing_blob_is_reported(cache: Registry) -> None:
    cache.put_manifest("plain/app", "v1", MANIFEST, OCI_MANIFEST, lazy_blobs=True)
    findings = cache.fsck().unrepaired
    assert sorted(f.kind for f in findings) == ["dangling_reference", "dangling_reference"]
    assert all(f.subject.startswith("plain/app@") for f in findings)


def test_gc_collects_cached_blobs_once_their_manifest_is_gone(cache: Registry) -> None:
    digest = cache.put_manifest("mirror/app", "v1", MANIFEST, OCI_MANIFEST, lazy_blobs=True).digest
    push_blob(cache, "mirror/app", LAYER)
    assert collect(cache, grace_seconds=0).blobs_deleted == 0  # referenced: kept

    cache.delete_manifest("mirror/app", digest, force=True)
    assert refcount(cache, LAYER) == (0, 1)
    assert collect(cache, grace_seconds=0).blobs_deleted == 1
    with pytest.raises(e.BlobUnknown):
        cache.stat_blob("mirror/app", digest_of(LAYER))
    assert cache.fsck().clean


def test_a_blob_arriving_after_its_tombstone_keeps_the_lazy_reference(cache: Registry) -> None:
    """The GC deleted a blob; a cached manifest names it; the blob is fetched again later."""
    push_blob(cache, "other", LAYER)
    cache.delete_blob("other", digest_of(LAYER))
    assert collect(cache, grace_seconds=0).blobs_deleted == 1
    cache.put_manifest("mirror/app", "v1", MANIFEST, OCI_MANIFEST, lazy_blobs=True)
    push_blob(cache, "mirror/app", LAYER)
    assert refcount(cache, LAYER) == (1, 1)
    assert collect(cache, grace_seconds=0).blobs_deleted == 0
    assert cache.fsck().clean
