"""Replication between cargohold instances on different backends: a filesystem source pushes
into a cargohold on S3 (SeaweedFS), and a pull rule brings the images back out of it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest

from cargohold.config import ReplicationSettings
from cargohold.replication import ReplicationService, replication_status
from tests.backends.stores.s3 import s3_server, store_env  # noqa: F401  (the session's SeaweedFS)
from tests.engine.conftest import make_registry, push_image
from tests.replication.support import digest_of_tag
from tests.support.servers import RegistryProcess

MiB = 1024 * 1024


@pytest.mark.slow
def test_a_filesystem_source_replicates_into_a_cargohold_on_s3_and_pulls_back(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source = make_registry(tmp_path / "source")
    base = os.urandom(7 * MiB)  # crosses the 2 MiB chunks and S3's 5 MiB parts
    first = push_image(source, "apps/one", "v1", b'{"app":1}', [base, os.urandom(1000)])
    second = push_image(source, "apps/two", "v1", b'{"app":2}', [base, os.urandom(2000)])
    with RegistryProcess(env={**store_env(request), "CARGOHOLD_WORKERS": "1"}) as on_s3:
        settings = ReplicationSettings(
            targets=[{"name": "s3", "url": on_s3.url}],
            rules=[
                {"name": "out", "target": "s3", "repositories": ["apps/*"]},
                {
                    "name": "back",
                    "direction": "pull",
                    "target": "s3",
                    "repositories": ["apps/*"],
                    "target_prefix": "returned/",
                },
            ],
            chunk_size="2MiB",
        )
        service = ReplicationService(source, settings)
        try:
            service.reconcile("out")
            assert service.drain(["out"], timeout=60).succeeded == 2
            assert digest_of_tag(on_s3.url, "apps/one", "v1") == first
            assert digest_of_tag(on_s3.url, "apps/two", "v1") == second
            layer = hashlib.sha256(base).hexdigest()
            pulled = httpx.get(f"{on_s3.url}/v2/apps/two/blobs/sha256:{layer}", follow_redirects=True)
            assert hashlib.sha256(pulled.content).hexdigest() == layer
            (out,) = [rule for rule in replication_status(source) if rule["rule"] == "out"]
            assert out["bytes_skipped"] == len(base)  # mounted from apps/one on the S3 side

            assert service.reconcile("back").jobs_enqueued == 2
            assert service.drain(["back"], timeout=60).succeeded == 2
        finally:
            service.close()
    assert source.get_manifest("returned/apps/one", "v1").digest == first
    assert source.get_manifest("returned/apps/two", "v1").digest == second
    (back,) = [rule for rule in replication_status(source) if rule["rule"] == "back"]
    # Pulling into a registry that stores every digest once: every blob is already here.
    assert back["bytes_sent"] < 10_000 and back["blobs_sent"] == 0


def test_images_sharing_a_base_replicated_side_by_side_send_the_base_once(tmp_path: Path) -> None:
    """A new rule over many images: its jobs run in parallel, and still no byte goes twice."""
    source = make_registry(tmp_path / "source")
    base = os.urandom(MiB)
    images = [
        push_image(source, f"fleet/app{n}", "v1", b'{"n":%d}' % n, [base, os.urandom(10_000)])
        for n in range(8)
    ]
    with RegistryProcess(env={"CARGOHOLD_WORKERS": "1"}) as target:
        settings = ReplicationSettings(
            targets=[{"name": "t", "url": target.url, "concurrency": 8}],
            rules=[{"name": "fleet", "target": "t", "repositories": ["fleet/*"]}],
            workers=8,
        )
        service = ReplicationService(source, settings)
        try:
            assert service.reconcile("fleet").jobs_enqueued == 8
            assert service.drain(["fleet"], timeout=60).succeeded == 8
        finally:
            service.close()
        for n, digest in enumerate(images):
            assert digest_of_tag(target.url, f"fleet/app{n}", "v1") == digest
    (rule,) = replication_status(source)
    assert rule["blobs_sent"] == 1 + 8 * 2  # the base once; a config and a layer per image
    assert rule["bytes_skipped"] == 7 * len(base)
    assert rule["bytes_sent"] < len(base) + 8 * 20_000
