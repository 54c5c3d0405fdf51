"""``cargohold replicate run`` from the CLI while ``cargohold serve`` on the same data directory
is replicating the same rule: one process runs the jobs at a time (the replication lease), so
no blob goes twice, the rate limit holds for the pair, and the store stays consistent."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.replication.support import (
    CountingProxy,
    caught_up,
    digest_of_tag,
    push_image,
    status,
    wait_for,
    write_config,
)
from tests.support.servers import RegistryProcess, cargohold_command

MiB = 1024 * 1024
IMAGES = 8


@pytest.mark.slow
def test_a_cli_run_beside_a_replicating_server_sends_nothing_twice(tmp_path: Path) -> None:
    with RegistryProcess(data_dir=tmp_path / "target", env={"CARGOHOLD_WORKERS": "1"}) as target:
        proxy = CountingProxy(target.port)
        config = write_config(
            tmp_path / "source.yaml",
            # Slow enough that the CLI starts while the shared base is still on its way.
            targets=[{"name": "far", "url": proxy.url, "rate_limit": "1MiB", "concurrency": 2}],
            rules=[{"name": "fleet", "target": "far", "repositories": ["fleet/*"]}],
            workers=2,
            chunk_size="1MiB",
        )
        env = {"CARGOHOLD_CONFIG": str(config), "CARGOHOLD_WORKERS": "2"}
        data = tmp_path / "source"
        with (
            RegistryProcess(data_dir=data, env=env) as source,
            httpx.Client(base_url=source.url, timeout=60) as client,
        ):
            base = os.urandom(8 * MiB)
            images = [
                push_image(client, f"fleet/app{n}", "v1", [base, os.urandom(64 * 1024)])
                for n in range(IMAGES)
            ]
            wait_for(lambda: proxy.sent > MiB, "the server to start sending", 30, 0.02)
            cli_env = {**os.environ, **env, "CARGOHOLD_DATA_DIR": str(data)}
            started = time.monotonic()
            run = subprocess.run(
                [*cargohold_command(), "replicate", "run", "fleet", "--json", "--timeout", "90"],
                env=cli_env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            took = time.monotonic() - started
            assert run.returncode == 0, run.stdout + run.stderr
            report = json.loads(run.stdout)
            wait_for(lambda: caught_up(source.url, "fleet"), "the rule to catch up", 60)
            state = status(source.url)["fleet"]
            for n, image in enumerate(images):
                assert digest_of_tag(target.url, f"fleet/app{n}", "v1") == image.digest
        proxy.close()
        fsck = subprocess.run(
            [*cargohold_command(), "fsck", "--json"], env=cli_env, capture_output=True, text=True, timeout=120
        )

    blobs = {digest: size for image in images for digest, size in image.blobs.items()}
    distinct = sum(blobs.values())
    print(
        f"\ncli beside server: cli {took:.1f}s, reconcile {report['reconcile']}, run {report['run']}; "
        f"{proxy.sent} bytes to the target for {distinct} distinct; blobs sent {state['blobs_sent']}"
    )
    # The CLI came while the server was still at work (the base takes 8 s at this rate)...
    assert report["reconcile"]["tags_compared"] == IMAGES and report["reconcile"]["in_sync"] < IMAGES
    assert state["jobs"]["dead"] == 0 and state["failures"] == 0
    assert len(blobs) == 1 + 2 * IMAGES
    assert state["blobs_sent"] == len(blobs)  # the base once; a config and a layer per image
    assert state["bytes_sent"] < distinct + 64 * 1024  # blobs once, manifests on top
    assert proxy.sent < distinct + 256 * 1024  # requests and headers on top
    # ...and left the jobs to it rather than run them beside it.
    assert report["run"]["left_to"] and report["run"]["jobs_run"] == 0 and report["run"]["waiting"] == 0
    assert fsck.returncode == 0 and json.loads(fsck.stdout)["clean"] is True, fsck.stdout
