"""The outbox: an event row exists exactly when its change was committed, and consumers
resume from their own cursor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cargohold.engine import Registry
from cargohold.engine.errors import ManifestBlobUnknown, ManifestUnknown
from cargohold.engine.events import DELETE, PULL, PUSH, TAG, UNTAG, Event
from tests.engine.conftest import digest_of, image_manifest, make_registry, push_blob, push_image

OCI = "application/vnd.oci.image.manifest.v1+json"


def actions(events: list[Event]) -> list[tuple[str, str | None, str | None]]:
    return [(e.action, e.tag, e.digest) for e in events]


def test_a_push_writes_push_then_tag_events(registry: Registry) -> None:
    digest = push_image(registry, "team/app", "v1", b'{"a":1}', [b"layer-1"])
    events = registry.events.after(0)
    assert actions(events) == [(PUSH, None, digest), (TAG, "v1", digest)]
    push, tag = events
    assert push.repository == tag.repository == "team/app"
    assert push.media_type == OCI and push.artifact_type == "application/vnd.oci.image.config.v1+json"
    assert push.subject is None and push.id < tag.id and push.created_at > 0


def test_re_putting_the_same_manifest_writes_nothing_and_a_tag_move_writes_a_tag_event(
    registry: Registry,
) -> None:
    first = push_image(registry, "team/app", "v1", b'{"a":1}', [b"layer-1"])
    manifest = image_manifest(b'{"a":1}', [b"layer-1"])
    registry.put_manifest("team/app", "v1", manifest, OCI)  # no change
    assert len(registry.events.after(0)) == 2
    second = push_image(registry, "team/app", "v1", b'{"a":2}', [b"layer-2"])
    assert actions(registry.events.after(2)) == [(PUSH, None, second), (TAG, "v1", second)]
    registry.put_manifest("team/app", "stable", manifest, OCI, tags=["v1"])  # v1 back, stable new
    assert actions(registry.events.after(4)) == [(TAG, "stable", first), (TAG, "v1", first)]


def test_a_referrer_push_carries_its_subject(registry: Registry) -> None:
    subject = push_image(registry, "team/app", "v1", b'{"a":1}', [b"layer-1"])
    push_blob(registry, "team/app", b"{}")
    signature = image_manifest(
        b"{}",
        [],
        artifactType="application/vnd.dev.cosign.artifact.sig.v1+json",
        subject={"mediaType": OCI, "digest": subject, "size": 1},
    )
    digest = registry.put_manifest("team/app", digest_of(signature), signature, OCI).digest
    (event,) = registry.events.after(2)
    assert (event.action, event.digest, event.tag, event.subject) == (PUSH, digest, None, subject)
    assert event.artifact_type == "application/vnd.dev.cosign.artifact.sig.v1+json"


def test_deletes_write_untag_and_delete_events(registry: Registry) -> None:
    digest = push_image(registry, "team/app", "v1", b'{"a":1}', [b"layer-1"])
    registry.put_manifest("team/app", "v2", image_manifest(b'{"a":1}', [b"layer-1"]), OCI)
    registry.delete_manifest("team/app", "v2")
    registry.delete_manifest("team/app", digest)
    tail = registry.events.after(3)
    assert actions(tail) == [(UNTAG, "v2", digest), (DELETE, None, digest)]
    assert tail[1].media_type == OCI
    with pytest.raises(ManifestUnknown):
        registry.delete_manifest("team/app", digest)
    with pytest.raises(ManifestUnknown):
        registry.delete_manifest("team/app", "v2")
    assert len(registry.events.after(0)) == 5


def test_a_refused_push_writes_no_event(registry: Registry) -> None:
    manifest = image_manifest(b'{"a":1}', [b"never-uploaded"])
    with pytest.raises(ManifestBlobUnknown):
        registry.put_manifest("team/app", "v1", manifest, OCI)
    assert registry.events.after(0) == []


def test_a_failure_after_the_event_insert_rolls_the_event_back(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event is written before the manifest rows; if writing them fails, both go."""
    for blob in (b'{"a":1}', b"layer-1"):
        push_blob(registry, "team/app", blob)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(registry.store, "set_tag", broken)
    with pytest.raises(RuntimeError):
        registry.put_manifest("team/app", "v1", image_manifest(b'{"a":1}', [b"layer-1"]), OCI)
    assert registry.events.after(0) == []
    monkeypatch.undo()
    digest = push_image(registry, "team/app", "v1", b'{"a":1}', [b"layer-1"])
    monkeypatch.setattr(registry.store, "delete_manifest", broken)
    with pytest.raises(RuntimeError):
        registry.delete_manifest("team/app", digest)
    assert [e.action for e in registry.events.after(0)] == [PUSH, TAG]


def test_consumers_resume_from_their_own_cursor_after_a_restart(tmp_path: Path) -> None:
    registry = make_registry(tmp_path)
    for n in range(3):
        push_image(registry, f"r{n}", "v1", b'{"n":%d}' % n, [b"layer-%d" % n])
    seen: list[int] = []
    assert registry.events.consume("a", lambda _conn, events: seen.extend(e.id for e in events), 4) == 4
    assert seen == [1, 2, 3, 4]

    def fails(_conn: object, _events: list[Event]) -> None:
        raise RuntimeError("consumer crashed")

    with pytest.raises(RuntimeError):
        registry.events.consume("a", fails)
    assert registry.events.cursor("a") == 4  # the failed batch was not consumed
    registry.store.close()

    restarted = make_registry(tmp_path)  # a new process on the same files
    assert restarted.events.cursor("a") == 4 and restarted.events.cursor("b") == 0
    restarted.events.consume("a", lambda _conn, events: seen.extend(e.id for e in events))
    assert seen == [1, 2, 3, 4, 5, 6]
    assert restarted.events.consume("a", fails) == 0  # nothing new: the handler is not called


def test_pruning_keeps_what_a_consumer_has_not_read(registry: Registry) -> None:
    for n in range(3):
        push_image(registry, "team/app", f"v{n}", b'{"n":%d}' % n, [b"layer-%d" % n])
    registry.events.advance("slow", 2)
    assert registry.events.prune(keep_seconds=0, now=time.time() + 1) == 2
    assert [e.id for e in registry.events.after(0)] == [3, 4, 5, 6]
    registry.events.forget("slow")
    registry.events.prune(keep_seconds=0, now=time.time() + 1)
    assert registry.events.after(0) == [] and registry.events.latest_id() == 6
    push_image(registry, "team/app", "v9", b'{"n":9}', [b"layer-9"])
    assert [e.id for e in registry.events.after(0)] == [7, 8]  # ids are never reused


def test_pull_events_are_off_by_default_and_sampled_when_on(tmp_path: Path) -> None:
    quiet = make_registry(tmp_path / "quiet")
    digest = push_image(quiet, "team/app", "v1", b'{"a":1}', [b"layer-1"])
    quiet.get_manifest("team/app", "v1")
    assert [e.action for e in quiet.events.after(0)] == [PUSH, TAG]

    loud = make_registry(tmp_path / "loud", pull_event_sample_rate=1.0)
    push_image(loud, "team/app", "v1", b'{"a":1}', [b"layer-1"])
    loud.get_manifest("team/app", "v1")
    loud.get_manifest("team/app", digest, with_data=False)  # a HEAD is not a pull
    loud.get_manifest("team/app", digest, record_pull=False)  # the registry's own read
    assert actions(loud.events.after(2)) == [(PULL, "v1", digest)]


KILL_WORKLOAD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tests.engine.conftest import make_registry, push_image
    registry = make_registry(Path(sys.argv[1]))
    n = 0
    while True:
        push_image(registry, f"repo-{n % 5}", f"t{n % 7}", b'{"n":%d}' % n, [b"layer-%d" % n])
        if n % 3 == 2:
            registry.delete_manifest(f"repo-{n % 5}", f"t{n % 7}")
        n += 1
        if n == 20:
            print("running", flush=True)
    """
)


@pytest.mark.slow
def test_kill_9_never_separates_a_change_from_its_event(tmp_path: Path) -> None:
    """Replaying the outbox from the start rebuilds exactly the tags and manifests that survived."""
    root = Path(__file__).resolve().parents[2]
    for attempt in range(3):
        data = tmp_path / f"run-{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_WORKLOAD, str(data)],
            cwd=root,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"running\n"
        time.sleep(0.3 + 0.2 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

        registry = make_registry(data)
        manifests: set[tuple[str, str]] = set()
        tags: dict[tuple[str, str], str] = {}
        for event in registry.events.after(0, limit=1_000_000):
            assert event.digest is not None
            if event.action == PUSH:
                manifests.add((event.repository, event.digest))
            elif event.action == TAG:
                tags[(event.repository, event.tag or "")] = event.digest
            elif event.action == UNTAG:
                del tags[(event.repository, event.tag or "")]
            elif event.action == DELETE:
                manifests.discard((event.repository, event.digest))
                tags = {k: v for k, v in tags.items() if (k[0], v) != (event.repository, event.digest)}
        conn = registry.store.read()
        stored = set(
            conn.execute(
                "SELECT r.name, m.digest FROM manifests m JOIN repositories r ON r.id = m.repository_id"
            ).fetchall()
        )
        stored_tags = {
            (r, t): d
            for r, t, d in conn.execute(
                "SELECT r.name, t.name, t.manifest_digest FROM tags t JOIN repositories r "
                "ON r.id = t.repository_id"
            )
        }
        assert len(manifests) > 5
        assert manifests == stored
        assert tags == stored_tags
        registry.store.close()
