"""SIGTERM: in-flight requests finish, batched writes (pull times) are flushed, the server exits."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.support.servers import RegistryProcess

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_sigterm_lets_a_slow_upload_finish_and_flushes_pull_times(tmp_path: Path) -> None:
    server = RegistryProcess(data_dir=tmp_path / "data", env={"CARGOHOLD_WORKERS": "1"}).start()
    assert server.proc is not None
    blob = os.urandom(4 * 1024 * 1024)
    config = b"{}"
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(config), "size": 2},
            "layers": [],
        }
    ).encode()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.post("/v2/down/app/blobs/uploads/", params={"digest": sha256(config)}, content=config)
        assert (
            client.put(
                "/v2/down/app/manifests/v1", content=manifest, headers={"Content-Type": OCI_MANIFEST}
            ).status_code
            == 201
        )
        assert client.get("/v2/down/app/manifests/v1", headers={"Accept": OCI_MANIFEST}).status_code == 200
        location = client.post("/v2/down/app/blobs/uploads/").headers["location"]
        halfway = threading.Event()
        result: dict[str, int] = {}

        def slow_body() -> Iterator[bytes]:
            for offset in range(0, len(blob), 256 * 1024):
                if offset == len(blob) // 2:
                    halfway.set()
                    time.sleep(1.0)  # SIGTERM arrives now
                yield blob[offset : offset + 256 * 1024]

        def upload() -> None:
            response = httpx.put(
                f"{server.url}{location}", params={"digest": sha256(blob)}, content=slow_body(), timeout=30
            )
            result["status"] = response.status_code

        sender = threading.Thread(target=upload)
        sender.start()
        assert halfway.wait(10)
        os.killpg(server.proc.pid, signal.SIGTERM)
        sender.join(30)
        assert server.proc.wait(30) is not None
    assert result.get("status") == 201, "the in-flight upload was cut off"
    db = sqlite3.connect(tmp_path / "data" / "metadata.db")
    assert db.execute("SELECT size FROM blobs WHERE digest = ?", (sha256(blob),)).fetchone() == (len(blob),)
    pulled = db.execute("SELECT last_pulled_at FROM tags WHERE name = 'v1'").fetchone()[0]
    assert pulled is not None, "the batched pull time was not flushed at shutdown"
