"""kill -9 of the whole server in the middle of pushes: the store stays consistent,
nothing acknowledged is lost, and every push can be redone or resumed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.consistency import check_data_dir
from tests.support.servers import RegistryProcess

pytestmark = pytest.mark.slow
MiB = 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(client: httpx.Client, repo: str, data: bytes) -> str:
    digest = sha256(data)
    response = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data)
    assert response.status_code == 201, response.text
    return digest


def manifest_for(config: bytes, layer: bytes) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha256(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()


def restart(server: RegistryProcess) -> RegistryProcess:
    return RegistryProcess(data_dir=server.data_dir).start()


def test_kill_during_a_chunked_upload_then_resume(tmp_path: Path) -> None:
    server = RegistryProcess(data_dir=tmp_path / "data").start()
    chunk = 32 * MiB
    blob = os.urandom(6 * chunk)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            location = client.post("/v2/crash/big/blobs/uploads/").headers["location"]
            for start in (0, chunk):
                response = client.patch(
                    location,
                    content=blob[start : start + chunk],
                    headers={"Content-Range": f"{start}-{start + chunk - 1}"},
                )
                assert response.status_code == 202
                location = response.headers["location"]
            streaming = threading.Event()

            def third_chunk() -> Iterator[bytes]:
                for offset in range(2 * chunk, 3 * chunk, MiB):
                    if offset >= 2 * chunk + 8 * MiB:
                        streaming.set()
                        time.sleep(0.2)
                    yield blob[offset : offset + MiB]

            def send() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    client.patch(
                        location,
                        content=third_chunk(),
                        headers={"Content-Range": f"{2 * chunk}-{3 * chunk - 1}"},
                    )

            sender = threading.Thread(target=send)
            sender.start()
            assert streaming.wait(30)
            server.kill()
            sender.join(30)
    finally:
        server.stop()

    assert check_data_dir(server.data_dir) == []
    server = restart(server)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            status = client.get(location)
            assert status.status_code == 204
            assert status.headers["range"] == f"0-{2 * chunk - 1}"  # only acknowledged chunks count
            for start in range(2 * chunk, len(blob), chunk):
                response = client.patch(
                    location,
                    content=blob[start : start + chunk],
                    headers={"Content-Range": f"{start}-{start + chunk - 1}"},
                )
                assert response.status_code == 202, response.text
            digest = sha256(blob)
            assert client.put(location, params={"digest": digest}).status_code == 201
            pulled = client.get(f"/v2/crash/big/blobs/{digest}")
            assert pulled.status_code == 200 and sha256(pulled.content) == digest
    finally:
        server.stop()
    assert check_data_dir(server.data_dir) == []


def test_kill_during_a_manifest_put_then_push_again(tmp_path: Path) -> None:
    server = RegistryProcess(data_dir=tmp_path / "data").start()
    config, layer = b'{"os":"linux"}', os.urandom(MiB)
    manifest = manifest_for(config, layer)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            push_blob(client, "crash/app", config)
            push_blob(client, "crash/app", layer)
            halfway = threading.Event()

            def slow_manifest() -> Iterator[bytes]:
                yield manifest[: len(manifest) // 2]
                halfway.set()
                time.sleep(5)
                yield manifest[len(manifest) // 2 :]

            def send() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    client.put(
                        "/v2/crash/app/manifests/v1",
                        content=slow_manifest(),
                        headers={"Content-Type": OCI_MANIFEST},
                    )

            sender = threading.Thread(target=send)
            sender.start()
            assert halfway.wait(10)
            time.sleep(0.2)
            server.kill()
            sender.join(30)
    finally:
        server.stop()

    assert check_data_dir(server.data_dir) == []
    server = restart(server)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.get("/v2/crash/app/manifests/v1").status_code == 404
            # The blobs were acknowledged before the crash: they are still there.
            assert client.head(f"/v2/crash/app/blobs/{sha256(layer)}").status_code == 200
            response = client.put(
                "/v2/crash/app/manifests/v1", content=manifest, headers={"Content-Type": OCI_MANIFEST}
            )
            assert response.status_code == 201
            assert (
                client.get("/v2/crash/app/manifests/v1", headers={"Accept": OCI_MANIFEST}).content == manifest
            )
    finally:
        server.stop()
    assert check_data_dir(server.data_dir) == []


def test_random_kills_during_concurrent_pushes_lose_nothing_acknowledged(tmp_path: Path) -> None:
    """Four rounds: 8 clients push images while the server is killed at a random moment."""
    rng = random.Random(7)
    acknowledged: dict[str, bytes] = {}  # "repo:tag" -> manifest bytes answered with 201
    layers: dict[str, bytes] = {}
    server = RegistryProcess(data_dir=tmp_path / "data")
    for round_number in range(4):
        server = RegistryProcess(data_dir=server.data_dir).start()
        stop = threading.Event()

        def pusher(
            worker: int, url: str = server.url, round_number: int = round_number, stop: threading.Event = stop
        ) -> None:
            with httpx.Client(base_url=url, timeout=10) as client:
                for i in range(1000):
                    if stop.is_set():
                        return
                    repo, tag = f"crash/w{worker}", f"r{round_number}-{i}"
                    config = json.dumps({"worker": worker, "i": i, "round": round_number}).encode()
                    layer = os.urandom(rng.choice([1000, 100_000, 2 * MiB]))
                    try:
                        push_blob(client, repo, config)
                        push_blob(client, repo, layer)
                        manifest = manifest_for(config, layer)
                        response = client.put(
                            f"/v2/{repo}/manifests/{tag}",
                            content=manifest,
                            headers={"Content-Type": OCI_MANIFEST},
                        )
                    except (httpx.HTTPError, AssertionError):
                        return
                    if response.status_code == 201:
                        acknowledged[f"{repo}:{tag}"] = manifest
                        layers[sha256(layer)] = layer

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(pusher, w) for w in range(8)]
            time.sleep(rng.uniform(0.5, 2.0))
            server.kill()
            stop.set()
            for future in futures:
                future.result()
        assert check_data_dir(server.data_dir, verify_digests=False) == []

    assert len(acknowledged) > 10
    server = RegistryProcess(data_dir=server.data_dir).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for reference, manifest in acknowledged.items():
                repo, tag = reference.split(":")
                got = client.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
                assert got.status_code == 200 and got.content == manifest, reference
                layer_digest = json.loads(manifest)["layers"][0]["digest"]
                blob = client.get(f"/v2/{repo}/blobs/{layer_digest}")
                assert blob.status_code == 200 and blob.content == layers[layer_digest]
    finally:
        server.stop()
    assert check_data_dir(server.data_dir) == []
