"""The engine's invariants, tested directly against a filesystem backend and SQLite."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from cargohold.engine import Registry
from cargohold.engine import errors as e
from cargohold.engine.layout import BLOB_PREFIX, blob_key
from tests.engine.conftest import digest_of, image_manifest, make_registry, push_blob, push_image

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def blob_row(registry: Registry, digest: str) -> dict[str, object]:
    conn = registry.store.read()
    cur = conn.execute("SELECT * FROM blobs WHERE digest = ?", (digest,))
    row = cur.fetchone()
    assert row is not None, f"no blob row for {digest}"
    return dict(zip([c[0] for c in cur.description], row, strict=True))


def stored_objects(registry: Registry) -> list[str]:
    return sorted(info.key for info in registry.backend.list(BLOB_PREFIX))


def read_all(registry: Registry, repository: str, digest: str) -> bytes:
    return b"".join(registry.open_blob(repository, digest).read())


# -- dedup and visibility -----------------------------------------------------------
def test_same_bytes_in_two_repositories_are_stored_once(registry: Registry) -> None:
    data = os.urandom(100_000)
    digest = push_blob(registry, "team/a", data)
    assert push_blob(registry, "team/b", data, parts=3) == digest
    assert len(stored_objects(registry)) == 1
    assert blob_row(registry, digest)["repo_links"] == 2
    assert read_all(registry, "team/a", digest) == data
    assert read_all(registry, "team/b", digest) == data
    assert registry.backend.list_staged is not None
    assert list(registry.backend.list_staged()) == []  # the redundant staged copy is gone


def test_a_blob_of_another_repository_is_invisible(registry: Registry) -> None:
    digest = push_blob(registry, "team/a", b"secret layer")
    with pytest.raises(e.BlobUnknown):
        registry.stat_blob("team/b", digest)
    with pytest.raises(e.BlobUnknown):
        registry.open_blob("team/b", digest)
    with pytest.raises(e.ManifestBlobUnknown):
        registry.put_manifest("team/b", "v1", image_manifest(b"secret layer", []), OCI_MANIFEST)


def test_mount_links_only_from_a_repository_that_has_the_blob(registry: Registry) -> None:
    digest = push_blob(registry, "src", b"layer bytes")
    assert registry.mount_blob("dst", digest, source="elsewhere") is None
    assert registry.mount_blob("dst", digest, source="src", may_read=lambda name: False) is None
    mounted = registry.mount_blob("dst", digest, source="src")
    assert mounted is not None and mounted.size == len(b"layer bytes")
    assert registry.stat_blob("dst", digest).size == len(b"layer bytes")
    assert registry.mount_blob("third", digest, source=None) is not None
    assert blob_row(registry, digest)["repo_links"] == 3


# -- verification ---------------------------------------------------------------------
def test_wrong_digest_is_refused_and_nothing_becomes_visible(registry: Registry) -> None:
    upload = registry.start_upload("r")
    registry.append_upload("r", upload.id, [b"actual bytes"])
    with pytest.raises(e.DigestInvalid):
        registry.finish_upload("r", upload.id, digest_of(b"claimed bytes"))
    with pytest.raises(e.BlobUnknown):
        registry.stat_blob("r", digest_of(b"actual bytes"))
    assert stored_objects(registry) == []
    assert list(registry.backend.list_staged()) == []


def test_sha512_uploads_are_verified_with_sha512(registry: Registry) -> None:
    data = os.urandom(5000)
    upload = registry.start_upload("r", algorithm="sha512")
    registry.append_upload("r", upload.id, [data[:1000]])
    info = registry.finish_upload("r", upload.id, digest_of(data, "sha512"), [data[1000:]])
    assert info.digest.startswith("sha512:")
    assert read_all(registry, "r", info.digest) == data


def test_final_digest_of_another_algorithm_rehashes_the_staged_bytes(registry: Registry) -> None:
    data = b"hash me twice"
    upload = registry.start_upload("r")  # sha256 session
    registry.append_upload("r", upload.id, [data])
    assert registry.finish_upload("r", upload.id, digest_of(data, "sha512")).size == len(data)


def test_unsupported_algorithm_is_digest_invalid(registry: Registry) -> None:
    with pytest.raises(e.DigestInvalid):
        registry.start_upload("r", algorithm="md5")


# -- refcounts ------------------------------------------------------------------------
def test_refcounts_follow_every_change(registry: Registry) -> None:
    config, layer = b'{"os":"linux"}', os.urandom(2048)
    digest = push_image(registry, "app", "v1", config, [layer])
    layer_digest = digest_of(layer)
    assert blob_row(registry, layer_digest)["manifest_refs"] == 1
    # The same manifest in a second repository references the layer a second time.
    registry.mount_blob("copy", layer_digest, "app")
    registry.mount_blob("copy", digest_of(config), "app")
    manifest = image_manifest(config, [layer])
    registry.put_manifest("copy", "v1", manifest, OCI_MANIFEST)
    assert blob_row(registry, layer_digest)["manifest_refs"] == 2
    # Re-putting the same manifest (another tag) adds no reference.
    registry.put_manifest("copy", "v2", manifest, OCI_MANIFEST)
    assert blob_row(registry, layer_digest)["manifest_refs"] == 2
    # Deleting a tag keeps the manifest; deleting the manifest drops its references.
    registry.delete_manifest("copy", "v2")
    assert blob_row(registry, layer_digest)["manifest_refs"] == 2
    registry.delete_manifest("copy", digest)
    assert blob_row(registry, layer_digest)["manifest_refs"] == 1
    with pytest.raises(e.ManifestUnknown):
        registry.get_manifest("copy", "v1")
    # Unlinking a blob drops a repository link.
    assert blob_row(registry, layer_digest)["repo_links"] == 2
    registry.delete_blob("copy", layer_digest)
    assert blob_row(registry, layer_digest)["repo_links"] == 1
    with pytest.raises(e.BlobUnknown):
        registry.delete_blob("copy", layer_digest)
    conn = registry.store.read()
    assert conn.execute("SELECT repo_count FROM manifest_content WHERE digest = ?", (digest,)).fetchone() == (
        1,
    )
    registry.delete_manifest("app", digest)
    assert blob_row(registry, layer_digest)["manifest_refs"] == 0
    assert conn.execute("SELECT COUNT(*) FROM manifest_content").fetchone() == (0,)


def test_refcounts_equal_the_reference_rows(registry: Registry) -> None:
    """Recount from the edges after a mixed history: the counters never drift."""
    layers = [os.urandom(300) for _ in range(4)]
    for i in range(3):
        push_image(registry, f"r{i}", "t", b"{}", layers[i : i + 2])
    registry.delete_manifest("r1", "t")  # a tag only
    registry.delete_manifest("r2", registry.get_manifest("r2", "t").digest)
    registry.delete_blob("r0", digest_of(layers[0]))
    registry.mount_blob("r3", digest_of(layers[1]), "r1")
    conn = registry.store.read()
    drift = conn.execute(
        "SELECT b.digest FROM blobs b WHERE b.manifest_refs != "
        "(SELECT COUNT(*) FROM manifest_references r WHERE r.target_digest = b.digest AND r.kind = 'blob') "
        "OR b.repo_links != (SELECT COUNT(*) FROM repository_blobs rb WHERE rb.digest = b.digest)"
    ).fetchall()
    assert drift == []


# -- copies, tombstones and crashes -----------------------------------------------------
def test_reupload_while_the_old_copy_is_being_deleted(registry: Registry) -> None:
    data = os.urandom(10_000)
    digest = push_blob(registry, "r", data)
    old_key = blob_row(registry, digest)["storage_key"]
    # What a GC sweep does first: tombstone the row and queue its copy for deletion.
    with registry.store.write() as conn:
        conn.execute("UPDATE blobs SET state = 'deleting' WHERE digest = ?", (digest,))
        registry.store.queue_object_deletion(conn, str(old_key), digest, 0.0)
    with pytest.raises(e.BlobUnknown):  # a tombstoned blob answers 404, so clients re-upload
        registry.stat_blob("r", digest)
    assert registry.mount_blob("other", digest, "r") is None
    # The client re-uploads while the sweep has not yet deleted the old copy.
    push_blob(registry, "r", data)
    new_key = blob_row(registry, digest)["storage_key"]
    assert new_key != old_key
    assert blob_row(registry, digest)["state"] == "live"
    # Now the sweep deletes the old copy: the new one is untouched.
    registry.backend.delete(str(old_key))
    assert read_all(registry, "r", digest) == data


def test_a_second_process_resumes_an_upload_from_the_stored_hash_state(tmp_path: Path) -> None:
    first = make_registry(tmp_path)
    data = os.urandom(300_000)
    upload = first.start_upload("r")
    first.append_upload("r", upload.id, [data[:100_000]])
    second = make_registry(tmp_path)  # no hash state for this upload
    second.append_upload("r", upload.id, [data[100_000:200_000]], start=100_000)
    first.append_upload("r", upload.id, [data[200_000:]], start=200_000)  # first's state is behind
    info = first.finish_upload("r", upload.id, digest_of(data))
    assert read_all(first, "r", info.digest) == data
    # The xxh3 scrub checksum cannot travel between processes: left for the scrubber.
    assert blob_row(first, info.digest)["checksum"] is None


def test_an_upload_in_one_process_records_its_scrub_checksum(registry: Registry) -> None:
    import xxhash

    data = os.urandom(70_000)
    digest = push_blob(registry, "r", data, parts=4)
    assert blob_row(registry, digest)["checksum"] == f"xxh3-128:{xxhash.xxh3_128(data).hexdigest()}"


def test_unacknowledged_bytes_left_by_a_crash_are_dropped(registry: Registry, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    upload = registry.start_upload("r")
    registry.append_upload("r", upload.id, [data[:20_000]])
    # A request that died after writing but before acknowledging leaves garbage behind.
    staged_file = tmp_path / "blobs" / "staging" / blob_key(upload.id).replace("/", "+")
    with open(staged_file, "ab") as staged:
        staged.write(b"garbage from a killed request")
    assert registry.upload_status("r", upload.id).size == 20_000
    registry.append_upload("r", upload.id, [data[20_000:]], start=20_000)
    assert registry.finish_upload("r", upload.id, digest_of(data)).size == len(data)
    assert read_all(registry, "r", digest_of(data)) == data


def test_out_of_order_chunk_is_refused_and_the_upload_continues(registry: Registry) -> None:
    upload = registry.start_upload("r")
    registry.append_upload("r", upload.id, [b"abc"], start=0)
    with pytest.raises(e.RangeInvalid) as info:
        registry.append_upload("r", upload.id, [b"xyz"], start=10)
    assert info.value.upload_offset == 3
    with pytest.raises(e.SizeInvalid):
        registry.append_upload("r", upload.id, [b"def"], start=3, length=5)
    assert registry.upload_status("r", upload.id).size == 3
    registry.append_upload("r", upload.id, [b"def"], start=3)
    assert registry.finish_upload("r", upload.id, digest_of(b"abcdef")).size == 6


def test_two_writers_on_one_upload_never_interleave(registry: Registry) -> None:
    upload = registry.start_upload("r")
    entered, release = threading.Event(), threading.Event()

    def slow_chunks():  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(10)
        yield b"first"

    worker = threading.Thread(target=registry.append_upload, args=("r", upload.id, slow_chunks()))
    worker.start()
    assert entered.wait(10)
    with pytest.raises(e.UploadBusy):
        registry.append_upload("r", upload.id, [b"second"])
    release.set()
    worker.join(10)
    assert registry.upload_status("r", upload.id).size == len(b"first")


def test_cancel_and_expiry_remove_sessions_and_staged_bytes(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, upload_expiry_seconds=60)
    kept, cancelled, expired = (registry.start_upload("r") for _ in range(3))
    registry.append_upload("r", expired.id, [b"partial"])
    registry.cancel_upload("r", cancelled.id)
    with pytest.raises(e.BlobUploadUnknown):
        registry.upload_status("r", cancelled.id)
    registry.backend.create_staged("blobs/or/orphan-from-a-crash")
    with registry.store.write() as conn:
        conn.execute("UPDATE uploads SET expires_at = 0 WHERE id = ?", (expired.id,))
    with pytest.raises(e.BlobUploadUnknown):
        registry.upload_status("r", expired.id)
    removed = registry.expire_uploads(staged_grace_seconds=-1)
    assert removed == 2
    assert [s.key for s in registry.backend.list_staged()] == [blob_key(kept.id)]
    assert registry.upload_status("r", kept.id).size == 0


def test_an_upload_belongs_to_its_repository(registry: Registry) -> None:
    upload = registry.start_upload("r")
    with pytest.raises(e.BlobUploadUnknown):
        registry.append_upload("other", upload.id, [b"x"])


# -- manifests -----------------------------------------------------------------------
def test_manifest_bytes_are_stored_exactly(registry: Registry) -> None:
    push_blob(registry, "r", b"{}")
    manifest = b'{  "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",\n'
    manifest += b'"config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": "'
    manifest += digest_of(b"{}").encode() + b'", "size": 2}, "layers": [] }'
    result = registry.put_manifest("r", "weird-spacing", manifest, OCI_MANIFEST)
    assert result.digest == digest_of(manifest)
    assert registry.get_manifest("r", "weird-spacing").data == manifest


def test_index_children_must_exist_and_subject_need_not(registry: Registry) -> None:
    child = push_image(registry, "r", "amd64", b"{}", [b"layer"])
    index = (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":['
        b'{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":1}]}'
    )
    missing = digest_of(b"no such manifest")
    with pytest.raises(e.ManifestBlobUnknown):
        registry.put_manifest("r", "multi", index % missing.encode(), None)
    registry.put_manifest("r", "multi", index % child.encode(), None)
    signature = image_manifest(b"{}", [], subject={"mediaType": OCI_MANIFEST, "digest": missing, "size": 5})
    result = registry.put_manifest("r", digest_of(signature), signature, OCI_MANIFEST)
    assert result.subject == missing
    page = registry.referrers("r", missing, None, None, 10)
    assert [d["digest"] for d in page.items] == [result.digest]


def test_manifest_over_the_limit_is_refused(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, manifest_max_bytes=100)
    with pytest.raises(e.ManifestTooLarge):
        registry.put_manifest("r", "t", b"{" + b" " * 200 + b"}", OCI_MANIFEST)


def test_deletes_can_be_disabled(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, delete_enabled=False)
    push_image(registry, "r", "t", b"{}", [b"l"])
    with pytest.raises(e.Unsupported):
        registry.delete_manifest("r", "t")
    with pytest.raises(e.Unsupported):
        registry.delete_blob("r", digest_of(b"l"))
