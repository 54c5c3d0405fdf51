"""The garbage collector against a real filesystem store and SQLite."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cargohold.engine import Registry
from cargohold.engine import errors as e
from cargohold.engine.jobs import JobAlreadyRunning
from cargohold.engine.layout import BLOB_PREFIX
from cargohold.gc import Pacing, collect
from tests.engine.conftest import digest_of, image_manifest, make_registry, push_blob, push_image

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def stored_keys(registry: Registry) -> set[str]:
    return {info.key for info in registry.backend.list(BLOB_PREFIX)}


def live_keys(registry: Registry) -> set[str]:
    rows = registry.store.read().execute("SELECT storage_key FROM blobs WHERE state = 'live'")
    return {row[0] for row in rows}


def age_everything(registry: Registry, seconds: float = 3600) -> None:
    """Pretend everything happened ``seconds`` ago (instead of sleeping past a grace period)."""
    with registry.store.write() as conn:
        conn.execute(
            "UPDATE blobs SET touched_at = touched_at - ?, created_at = created_at - ?", (seconds, seconds)
        )
        conn.execute("UPDATE manifests SET created_at = created_at - ?", (seconds,))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return make_registry(tmp_path)


def test_collects_unreferenced_idle_blobs_and_keeps_the_rest(registry: Registry) -> None:
    kept_layer, orphan, young = os.urandom(1000), os.urandom(2000), os.urandom(3000)
    push_image(registry, "app", "v1", b"{}", [kept_layer])
    push_blob(registry, "app", orphan)
    age_everything(registry)
    push_blob(registry, "app", young)  # inside the grace period

    report = collect(registry, grace_seconds=600)

    assert report.blobs_deleted == 1 and report.bytes_freed == len(orphan)
    with pytest.raises(e.BlobUnknown):
        registry.stat_blob("app", digest_of(orphan))
    assert registry.stat_blob("app", digest_of(kept_layer)).size == len(kept_layer)
    assert registry.stat_blob("app", digest_of(young)).size == len(young)
    assert stored_keys(registry) == live_keys(registry)  # the bytes are really gone
    assert registry.store.read().execute(
        "SELECT COUNT(*) FROM blobs WHERE digest = ?", (digest_of(orphan),)
    ).fetchone() == (0,)


def test_deleting_a_manifest_frees_its_layers_unless_shared(registry: Registry) -> None:
    shared, own = os.urandom(500), os.urandom(700)
    first = push_image(registry, "a", "v1", b'{"a":1}', [shared, own])
    push_image(registry, "b", "v1", b'{"b":1}', [shared])
    registry.delete_manifest("a", first)
    age_everything(registry)
    report = collect(registry, grace_seconds=60)
    assert report.blobs_deleted == 2  # own layer and a's config
    assert registry.stat_blob("b", digest_of(shared)).size == len(shared)  # b still references it
    with pytest.raises(e.BlobUnknown):
        registry.stat_blob("a", digest_of(own))
    assert stored_keys(registry) == live_keys(registry)


def test_dry_run_lists_exactly_what_a_run_then_deletes(registry: Registry) -> None:
    orphans = [os.urandom(100 + i) for i in range(5)]
    for blob in orphans:
        push_blob(registry, "r", blob)
    push_image(registry, "r", "keep", b"{}", [b"kept"])
    registry.backend.put("blobs/zz/leaked-by-a-crash", [b"leak"])
    age_everything(registry)
    before = stored_keys(registry)

    plan = collect(registry, grace_seconds=0, dry_run=True)
    assert stored_keys(registry) == before  # nothing changed
    planned = {item.get("digest") or item.get("key") for item in plan.would_delete}
    assert planned == {digest_of(b) for b in orphans} | {"blobs/zz/leaked-by-a-crash"}
    assert plan.bytes_freed == sum(map(len, orphans))

    report = collect(registry, grace_seconds=0)
    assert report.blobs_deleted == plan.blobs_deleted and report.bytes_freed == plan.bytes_freed
    assert report.leaks_deleted == 1 and report.leak_bytes_freed == 4
    assert stored_keys(registry) == live_keys(registry)


def test_young_leaks_are_left_alone(registry: Registry) -> None:
    registry.backend.put("blobs/zz/just-written", [b"maybe about to be recorded"])
    assert collect(registry, grace_seconds=3600).leaks_deleted == 0
    assert "blobs/zz/just-written" in stored_keys(registry)


def test_the_store_is_listed_for_leaks_at_most_once_per_interval(registry: Registry) -> None:
    day = 86400.0
    first = collect(registry, grace_seconds=0, leak_scan_every=day)
    assert first.leak_scan  # never scanned before
    registry.backend.put("blobs/zz/leaked-after-the-scan", [b"leak"])
    time.sleep(0.01)  # older than the cutoff of the runs below

    second = collect(registry, grace_seconds=0, leak_scan_every=day)
    assert not second.leak_scan and second.leaks_deleted == 0
    assert not collect(registry, grace_seconds=0, dry_run=True, leak_scan_every=day).would_delete
    assert "blobs/zz/leaked-after-the-scan" in stored_keys(registry)

    forced = collect(registry, grace_seconds=0, leak_scan_every=0)  # cargohold gc --scan-leaks
    assert forced.leak_scan and forced.leaks_deleted == 1
    assert "blobs/zz/leaked-after-the-scan" not in stored_keys(registry)

    with registry.store.write() as conn:  # a day later
        conn.execute("UPDATE job_runs SET started_at = started_at - ?", (day,))
    registry.backend.put("blobs/zz/another", [b"leak"])
    time.sleep(0.01)
    assert collect(registry, grace_seconds=0, leak_scan_every=day).leaks_deleted == 1


def test_a_failed_run_does_not_count_as_a_leak_scan(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(cutoff: float) -> list[object]:
        raise OSError("store unreachable while listing")

    monkeypatch.setattr(registry.collection, "leaks", broken)
    with pytest.raises(OSError):
        collect(registry, grace_seconds=0, leak_scan_every=86400)
    monkeypatch.undo()
    registry.backend.put("blobs/zz/leak", [b"leak"])
    time.sleep(0.01)
    assert collect(registry, grace_seconds=0, leak_scan_every=86400).leaks_deleted == 1


def test_a_sweep_interrupted_before_the_physical_delete_resumes(registry: Registry) -> None:
    data = os.urandom(4096)
    digest = push_blob(registry, "r", data)
    age_everything(registry)
    cutoff = time.time()
    tombstoned = registry.collection.sweep(cutoff)  # then the process dies
    assert [b.digest for b in tombstoned.blobs] == [digest]
    with pytest.raises(e.BlobUnknown):
        registry.stat_blob("r", digest)
    assert len(stored_keys(registry)) == 1  # bytes still there, queued
    restarted = make_registry(Path(registry.store.path).parent)
    assert restarted.collection.leaks(time.time() + 60) == []  # queued is not leaked
    planned = collect(restarted, grace_seconds=60, dry_run=True)
    assert [(item["kind"], item["size"]) for item in planned.would_delete] == [("queued", len(data))]

    report = collect(restarted, grace_seconds=60)
    assert report.resumed_deletions == 1
    assert stored_keys(registry) == set()
    assert restarted.collection.queued() == []


def test_copies_whose_delete_fails_stay_queued_until_a_run_deletes_them(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = [os.urandom(500 + i) for i in range(3)]
    for data in blobs:
        push_blob(registry, "r", data)
    age_everything(registry)
    backend = registry.backend
    stubborn = sorted(stored_keys(registry))[1]

    def delete_all_but_one(keys: list[str], gently: bool = False) -> object:
        backend.delete_many([key for key in keys if key != stubborn])
        return lambda: [stubborn] if stubborn in keys else []

    monkeypatch.setattr(backend, "start_delete_many", delete_all_but_one)
    report = collect(registry, grace_seconds=0)
    assert report.blobs_deleted == 2 and report.errors == [f"could not delete {stubborn}"]
    assert stored_keys(registry) == {stubborn}
    assert [blob.storage_key for blob in registry.collection.queued()] == [stubborn]
    assert registry.store.read().execute("SELECT COUNT(*) FROM doomed_pages").fetchone() == (0,)

    monkeypatch.undo()
    again = collect(registry, grace_seconds=0)
    assert again.resumed_deletions == 1 and again.errors == []
    assert stored_keys(registry) == set() and registry.collection.queued() == []


def test_sweep_rechecks_so_a_manifest_put_that_won_keeps_its_blob(registry: Registry) -> None:
    config, layer = b"{}", os.urandom(900)
    push_blob(registry, "r", config)
    push_blob(registry, "r", layer)
    age_everything(registry)
    candidates = [b.digest for page in registry.collection.mark(time.time()) for b in page]
    assert set(candidates) == {digest_of(config), digest_of(layer)}
    registry.put_manifest("r", "v1", image_manifest(config, [layer]), OCI_MANIFEST)  # the PUT wins
    assert registry.collection.sweep(time.time()).blobs == []
    assert registry.stat_blob("r", digest_of(layer)).size == len(layer)


def test_a_manifest_put_after_the_sweep_is_refused_until_the_client_reuploads(registry: Registry) -> None:
    config, layer = b"{}", os.urandom(900)
    push_blob(registry, "r", config)
    push_blob(registry, "r", layer)
    age_everything(registry)
    collect(registry, grace_seconds=0)  # the sweep wins
    with pytest.raises(e.ManifestBlobUnknown):
        registry.put_manifest("r", "v1", image_manifest(config, [layer]), OCI_MANIFEST)
    push_blob(registry, "r", config)
    push_blob(registry, "r", layer)
    registry.put_manifest("r", "v1", image_manifest(config, [layer]), OCI_MANIFEST)
    assert b"".join(registry.open_blob("r", digest_of(layer)).read()) == layer


def test_orphan_referrers_go_after_the_grace_period(registry: Registry) -> None:
    subject = push_image(registry, "r", "v1", b"{}", [b"layer"])
    signature = image_manifest(b"{}", [], subject={"mediaType": OCI_MANIFEST, "digest": subject, "size": 1})
    sig_digest = registry.put_manifest("r", digest_of(signature), signature, OCI_MANIFEST).digest
    registry.delete_manifest("r", subject)
    assert collect(registry, grace_seconds=3600).referrers_deleted == 0  # too young
    age_everything(registry)
    assert collect(registry, grace_seconds=60).referrers_deleted == 1
    with pytest.raises(e.ManifestUnknown):
        registry.get_manifest("r", sig_digest)


def test_only_one_run_at_a_time_and_every_run_is_reported(registry: Registry) -> None:
    assert registry.jobs.acquire("gc", ttl=60)
    other = make_registry(Path(registry.store.path).parent)
    with pytest.raises(JobAlreadyRunning):
        collect(other, grace_seconds=0)
    registry.jobs.release("gc")
    collect(other, grace_seconds=0, dry_run=True)
    collect(other, grace_seconds=0)
    runs = other.jobs.runs("gc")
    assert [(r.dry_run, r.status) for r in runs] == [(False, "succeeded"), (True, "succeeded")]
    assert runs[0].finished_at is not None and "bytes_freed" in runs[0].summary


def test_an_expired_lease_does_not_block_forever(registry: Registry) -> None:
    assert registry.jobs.acquire("gc", ttl=0.01)
    time.sleep(0.05)
    other = make_registry(Path(registry.store.path).parent)
    assert collect(other, grace_seconds=0).finished_at is not None


def test_gc_runs_while_pushes_go_on(registry: Registry) -> None:
    """Threads push and GC loops with no grace period; every acknowledged image stays whole."""
    stop = threading.Event()
    acknowledged: list[tuple[str, bytes]] = []
    shared = os.urandom(2048)

    def gc_loop() -> None:
        while not stop.is_set():
            collect(make_registry(Path(registry.store.path).parent), grace_seconds=0)

    def pusher(n: int) -> None:
        local = make_registry(Path(registry.store.path).parent)
        for i in range(15):
            layer = os.urandom(1000 + i)
            for _attempt in range(20):
                try:
                    push_blob(local, f"p{n}", b"{}")
                    push_blob(local, f"p{n}", shared)
                    push_blob(local, f"p{n}", layer)
                    manifest = image_manifest(b"{}", [shared, layer])
                    local.put_manifest(f"p{n}", f"t{i}", manifest, OCI_MANIFEST)
                    acknowledged.append((f"p{n}", manifest))
                    break
                except (e.ManifestBlobUnknown, JobAlreadyRunning):
                    continue  # the sweep won: upload again, as a client must

    gc_thread = threading.Thread(target=gc_loop)
    gc_thread.start()
    pushers = [threading.Thread(target=pusher, args=(n,)) for n in range(3)]
    for thread in pushers:
        thread.start()
    for thread in pushers:
        thread.join()
    stop.set()
    gc_thread.join()
    assert len(acknowledged) == 45
    for repository, manifest in acknowledged:
        got = registry.get_manifest(repository, digest_of(manifest))
        assert got.data == manifest
        for layer in (shared,):
            assert b"".join(registry.open_blob(repository, digest_of(layer)).read()) == layer


def test_pacing_yields_between_sweep_batches_and_more_while_others_write(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cargohold.gc.collector as collector

    pauses: list[float] = []
    monkeypatch.setattr(collector.time, "sleep", pauses.append)

    def one_page_of_garbage(size: int) -> None:
        for i in range(3):
            push_blob(registry, "r", os.urandom(size + i))
        age_everything(registry)

    one_page_of_garbage(100)
    collect(registry, grace_seconds=0)
    assert pauses == [0.0]  # no pacing: flat out
    one_page_of_garbage(200)
    assert collect(registry, grace_seconds=0, pacing=Pacing(always=1.0)).blobs_deleted == 3
    assert len(pauses) == 2 and pauses[1] > 0
    one_page_of_garbage(300)
    collect(registry, grace_seconds=0, pacing=Pacing(when_busy=5.0))
    assert pauses[2] == 0.0  # nobody else wrote during the page
    versions = iter(range(100))
    monkeypatch.setattr(registry.store, "data_version", lambda: next(versions))  # others commit
    one_page_of_garbage(400)
    collect(registry, grace_seconds=0, pacing=Pacing(when_busy=5.0))
    assert pauses[3] > 0


def test_while_others_write_a_pages_deletes_finish_before_its_pause(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cargohold.gc.collector as collector

    stored_at_pause: list[int] = []
    monkeypatch.setattr(collector.time, "sleep", lambda _: stored_at_pause.append(len(stored_keys(registry))))
    collection = registry.collection
    start_deleting = collection.start_deleting
    # Deletes that happen only when waited for, so the order of wait and pause shows.
    gently_flags: list[bool] = []

    def deferred(blobs: object, gently: bool = False) -> object:
        gently_flags.append(gently)
        return lambda: start_deleting(blobs, gently)()

    monkeypatch.setattr(collection, "start_deleting", deferred)
    for i in range(3):
        push_blob(registry, "r", os.urandom(100 + i))
    age_everything(registry)

    collect(registry, grace_seconds=0, pacing=Pacing(when_busy=1.0))
    assert stored_at_pause == [3]  # idle: the page's deletes run on past its pause
    assert gently_flags == [False]  # with all of the store's parallelism
    assert stored_keys(registry) == set()

    for i in range(3):
        push_blob(registry, "r", os.urandom(200 + i))
    age_everything(registry)
    versions = iter(range(100))
    monkeypatch.setattr(registry.store, "data_version", lambda: next(versions))  # others commit
    collect(registry, grace_seconds=0, pacing=Pacing(when_busy=1.0))
    assert stored_at_pause[1:] == [0]  # busy: the pause comes after the page's deletes
    assert gently_flags == [False, True]  # and they leave the disk to the requests
    assert stored_keys(registry) == set()


def test_the_leak_walk_finds_unnamed_keys_whatever_the_duplicates() -> None:
    from cargohold.engine.collection import _missing

    named = ["blobs/a", "blobs/a", "blobs/c", "blobs/c", "blobs/e"]  # listed twice: UNION ALL
    listing = ["blobs/a", "blobs/b", "blobs/c", "blobs/d", "blobs/f"]
    assert list(_missing(listing, iter(named), lambda key: key)) == ["blobs/b", "blobs/d", "blobs/f"]


def test_a_run_reads_the_metadata_file_ahead_only_before_a_big_sweep(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cargohold.engine.collection as collection_module

    monkeypatch.setattr(collection_module, "READ_AHEAD_CANDIDATES", 3)
    reads: list[object] = []
    monkeypatch.setattr(registry.store, "read_ahead", lambda: reads.append(1))
    push_image(registry, "app", "v1", b"{}", [os.urandom(100)])  # referenced: no candidate
    for i in range(2):
        push_blob(registry, "app", os.urandom(10 + i))
    collect(registry, grace_seconds=3600)
    assert reads == []  # two candidates: a small sweep, nothing to warm up
    for i in range(3):
        push_blob(registry, "app", os.urandom(20 + i))
    collect(registry, grace_seconds=3600)
    assert reads == [1]
