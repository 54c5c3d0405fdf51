"""Several worker processes on one SQLite file: an upload whose requests land in different
processes still completes correctly (the running hash is rebuilt from staged bytes), and
concurrent writers leave a consistent store."""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.support.consistency import check_data_dir
from tests.support.servers import RegistryProcess

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunked_push(url: str, repo: str, blob: bytes, chunk: int) -> str:
    """Every request on a new connection, so the workers take turns."""
    location = httpx.post(f"{url}/v2/{repo}/blobs/uploads/").headers["location"]
    for start in range(0, len(blob), chunk):
        piece = blob[start : start + chunk]
        response = httpx.patch(
            url + location, content=piece, headers={"Content-Range": f"{start}-{start + len(piece) - 1}"}
        )
        assert response.status_code == 202, response.text
        location = response.headers["location"]
    response = httpx.put(url + location, params={"digest": sha256(blob)})
    assert response.status_code == 201, response.text
    return response.headers["docker-content-digest"]


def test_uploads_and_manifests_across_worker_processes(tmp_path: Path) -> None:
    with RegistryProcess(data_dir=tmp_path / "data", env={"CARGOHOLD_WORKERS": "2"}) as server:
        blobs = [os.urandom(3 * 1024 * 1024 + i) for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            digests = list(pool.map(lambda b: chunked_push(server.url, "multi/app", b, 512 * 1024), blobs))
        assert digests == [sha256(b) for b in blobs]
        for blob, digest in zip(blobs, digests, strict=True):
            assert httpx.get(f"{server.url}/v2/multi/app/blobs/{digest}").content == blob

        # Many writers move one tag and push manifests at once.
        config = b"{}"
        httpx.post(
            f"{server.url}/v2/multi/app/blobs/uploads/", params={"digest": sha256(config)}, content=config
        )

        def put_manifest(i: int) -> int:
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {
                        "mediaType": "application/vnd.oci.empty.v1+json",
                        "digest": sha256(config),
                        "size": 2,
                    },
                    "layers": [
                        {
                            "mediaType": "application/octet-stream",
                            "digest": digests[i % 6],
                            "size": len(blobs[i % 6]),
                        }
                    ],
                    "annotations": {"i": str(i)},
                }
            ).encode()
            return httpx.put(
                f"{server.url}/v2/multi/app/manifests/latest",
                content=manifest,
                headers={"Content-Type": OCI_MANIFEST},
            ).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(put_manifest, range(40))) == {201}
        time.sleep(1.5)  # access lines are written in batches, at least once a second
        pids = {
            json.loads(line)["pid"]
            for line in server.log().splitlines()
            if line.startswith("{") and '"PATCH"' in line
        }
        assert len(pids) == 2, "both workers should have taken part in the chunked uploads"
    assert check_data_dir(server.data_dir) == []
