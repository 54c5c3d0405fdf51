"""Faults: the target dies in the middle of a 500 MiB layer, the source is killed (-9) with
jobs pending and one running. Replication resumes from the target's acknowledged offset
and from the jobs table: nothing is lost, nothing is sent or done twice."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cargohold.config import ReplicationSettings
from cargohold.replication import ReplicationService, replication_status
from tests.engine.conftest import make_registry
from tests.replication.support import (
    CountingProxy,
    caught_up,
    digest_of_tag,
    push_image,
    push_large_image,
    status,
    wait_for,
    write_config,
)
from tests.support.memory import current_rss, peak_rss, reset_peak, tree_peak_rss
from tests.support.servers import RegistryProcess

MiB = 1024 * 1024
LAYER = 500 * MiB
CHUNK = 8 * MiB
SERVER_PEAK = 200 * MiB  # a server tree (supervisor and one worker), whatever the blob size


@pytest.fixture
def target(tmp_path: Path) -> Iterator[RegistryProcess]:
    with RegistryProcess(data_dir=tmp_path / "target", env={"CARGOHOLD_WORKERS": "1"}) as server:
        yield server


def restart(server: RegistryProcess) -> None:
    """Start a stopped (or killed) server again on the same port and data directory."""
    server.proc = None
    server.start()


def sent_so_far(source: RegistryProcess, rule: str) -> int:
    return int(status(source.url)[rule]["bytes_sent"])


@pytest.mark.slow
def test_a_target_stopped_mid_layer_resumes_from_the_acknowledged_offset(
    tmp_path: Path, target: RegistryProcess
) -> None:
    """A 500 MiB layer, generated and sent as a stream: no process under test (this one, the
    source, either life of the target) holds it, and the resumed transfer sends only the rest."""
    proxy = CountingProxy(target.port)
    config = write_config(
        tmp_path / "source.yaml",
        targets=[{"name": "far", "url": proxy.url, "rate_limit": "160MiB"}],
        rules=[{"name": "to-far", "target": "far", "repositories": ["big/*"]}],
        chunk_size=f"{CHUNK // MiB}MiB",
        backoff=0.3,
    )
    reset_peak(os.getpid())
    runner_before = current_rss(os.getpid())
    env = {"CARGOHOLD_CONFIG": str(config), "CARGOHOLD_WORKERS": "1"}
    with (
        RegistryProcess(data_dir=tmp_path / "source", env=env) as source,
        httpx.Client(base_url=source.url, timeout=120) as client,
    ):
        assert source.proc is not None and target.proc is not None
        image = push_large_image(client, "big/app", "v1", 5, LAYER)
        wait_for(
            lambda: sent_so_far(source, "to-far") > LAYER // 3, "a third of the layer to be sent", 60, 0.02
        )
        target_peaks = tree_peak_rss(target.proc.pid)  # the first life, just before it dies
        target.kill()  # the far region goes away mid-transfer
        at_kill = proxy.sent
        time.sleep(1.0)  # attempts fail meanwhile (connection refused) and back off
        restart(target)
        assert target.proc is not None
        wait_for(lambda: digest_of_tag(target.url, "big/app", "v1") == image.digest, "the image", 90)
        wait_for(lambda: caught_up(source.url, "to-far"), "the rule to catch up")
        state = status(source.url)["to-far"]
        source_peaks = tree_peak_rss(source.proc.pid)
        after = tree_peak_rss(target.proc.pid)
    proxy.close()
    runner_growth = peak_rss(os.getpid()) - runner_before

    whole = sum(image.blobs.values())
    after_restart = proxy.sent - at_kill
    print(
        f"\nresume: layer {LAYER / MiB:.0f} MiB; {at_kill / MiB:.1f} MiB on the wire when the target died, "
        f"{after_restart / MiB:.1f} MiB after it came back, {proxy.sent / MiB:.1f} MiB in all "
        f"({proxy.sent / LAYER:.3f}x); {state['failures']} failed attempts; peak RSS: source "
        f"{sum(source_peaks.values()) / MiB:.0f} MiB, target {sum(target_peaks.values()) / MiB:.0f} MiB "
        f"before the kill and {sum(after.values()) / MiB:.0f} MiB after; "
        f"test runner +{runner_growth / MiB:.0f} MiB"
    )
    assert LAYER // 4 < at_kill < LAYER * 3 // 4  # it really was cut in the middle
    assert state["failures"] >= 1 and state["jobs"]["dead"] == 0 and state["blobs_sent"] == 2
    # Resumed from the acknowledged offset: at most the chunk in flight is sent again.
    assert proxy.sent < whole + CHUNK + MiB
    assert after_restart < LAYER - at_kill + CHUNK + MiB
    # Streams, not buffers: nobody held the layer, or even a tenth of it.
    for peaks in (source_peaks, target_peaks, after):
        assert sum(peaks.values()) < SERVER_PEAK, peaks
    assert runner_growth < LAYER // 10


@pytest.mark.slow
def test_the_source_killed_with_jobs_pending_and_running_loses_and_repeats_nothing(
    tmp_path: Path, target: RegistryProcess
) -> None:
    proxy = CountingProxy(target.port)
    config = write_config(
        tmp_path / "source.yaml",
        # One job at a time on this target: the small images wait behind the big one.
        targets=[{"name": "far", "url": proxy.url, "rate_limit": "16MiB", "concurrency": 1}],
        rules=[{"name": "to-far", "target": "far", "repositories": ["app/*"]}],
        chunk_size="2MiB",
    )
    source = RegistryProcess(data_dir=tmp_path / "source", env={"CARGOHOLD_CONFIG": str(config)})
    source.start()
    try:
        with httpx.Client(base_url=source.url, timeout=60) as client:
            big = push_image(client, "app/big", "v1", [os.urandom(24 * MiB)])
            small = [push_image(client, f"app/small{n}", "v1", [os.urandom(64 * 1024)]) for n in range(3)]
        wait_for(lambda: sent_so_far(source, "to-far") > 6 * MiB, "the big layer to be on its way", 30, 0.05)
        jobs = status(source.url)["to-far"]["jobs"]
        source.kill()
        at_kill = proxy.sent
        assert jobs["running"] >= 1 and jobs["pending"] + jobs["running"] == 4, jobs

        restart(source)  # a new process: the dead one's running job is handed back, pending ones wait
        wait_for(lambda: digest_of_tag(target.url, "app/big", "v1") == big.digest, "the big image", 60)
        for n, image in enumerate(small):
            wait_for(
                lambda n=n, i=image: digest_of_tag(target.url, f"app/small{n}", "v1") == i.digest, "small"
            )
        wait_for(lambda: caught_up(source.url, "to-far"), "the rule to catch up")
        state = status(source.url)["to-far"]
    finally:
        source.cleanup()
        proxy.close()

    everything = sum(sum(image.blobs.values()) for image in [big, *small])
    print(f"\nsource kill: {at_kill} bytes sent before the kill, {proxy.sent} in all for {everything}")
    assert state["jobs"] == {"pending": 0, "running": 0, "done": 4, "dead": 0}  # one job per tag, once
    assert state["blobs_sent"] == 2 * 4  # a config and a layer per image: none sent twice
    assert proxy.sent < everything + 3 * MiB  # at most the chunk in flight again


@pytest.mark.slow
def test_a_pull_cut_by_the_remote_dying_resumes_from_what_this_registry_acknowledged(tmp_path: Path) -> None:
    """Pull mode: the copy lands in this registry's own upload session, chunk by chunk; when
    the remote comes back, the job asks the engine where the session stands and fetches
    only the rest (a ranged GET)."""
    remote = RegistryProcess(kind="distribution", data_dir=tmp_path / "remote")
    remote.start()
    proxy = CountingProxy(remote.port)
    registry = make_registry(tmp_path / "local")
    settings = ReplicationSettings(
        targets=[{"name": "remote", "url": proxy.url, "rate_limit": "16MiB"}],
        rules=[
            {
                "name": "mirror",
                "direction": "pull",
                "target": "remote",
                "repositories": ["big/app"],
                "target_prefix": "mirror/",
            }
        ],
        chunk_size="2MiB",
        backoff=0.2,
        backoff_max=1,
        max_attempts=50,
    )
    service = ReplicationService(registry, settings)
    try:
        with httpx.Client(base_url=remote.url, timeout=60) as client:
            image = push_image(client, "big/app", "v1", [os.urandom(24 * MiB)])
        assert service.reconcile("mirror").jobs_enqueued == 1
        first = threading.Thread(target=service.drain, args=(["mirror"],), kwargs={"timeout": 60})
        first.start()
        wait_for(lambda: proxy.received > 8 * MiB, "a third of the layer to arrive", 30, 0.02)
        remote.kill()
        at_kill = proxy.received
        first.join(60)  # the job failed and is backing off: the drain returns
        restart(remote)
        wait_for(
            lambda: service.drain(["mirror"], timeout=30).succeeded, "the pull to complete", 60, interval=0.3
        )
    finally:
        service.close()
        remote.cleanup()
        proxy.close()
    layer = max(image.blobs.values())
    assert registry.get_manifest("mirror/big/app", "v1").digest == image.digest
    (rule,) = replication_status(registry)
    print(f"\npull resume: layer {layer}, {at_kill} received when the remote died, {proxy.received} in all")
    assert rule["failures"] >= 1 and rule["jobs"]["done"] == 1
    assert 4 * MiB < at_kill < layer
    assert proxy.received < layer + 3 * MiB
