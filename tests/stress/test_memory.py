"""Memory stays flat whatever the blob size: push and pull a 2 GiB blob, monolithic and
chunked, and read the peak RSS (VmHWM) of every server process afterwards."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.memory import tree_peak_rss
from tests.support.servers import RegistryProcess

pytestmark = pytest.mark.slow
MiB = 1024 * 1024
BLOB_SIZE = 2048 * MiB
PEAK_LIMIT = 150 * MiB


def pattern_blob(seed: int) -> Iterator[bytes]:
    """2 GiB of deterministic bytes, generated in 8 MiB pieces (never held whole)."""
    block = hashlib.sha512(str(seed).encode()).digest() * (8 * MiB // 64)
    for i in range(BLOB_SIZE // len(block)):
        yield bytes([i % 251]) + block[1:]


def test_two_gib_push_and_pull_keep_server_memory_flat(tmp_path: Path) -> None:
    # One worker: the figure is the whole server tree (supervisor + worker) of a single-worker server.
    with RegistryProcess(data_dir=tmp_path / "data", env={"CARGOHOLD_WORKERS": "1"}) as server:
        assert server.proc is not None
        expected = hashlib.sha256()
        for piece in pattern_blob(1):
            expected.update(piece)
        digest = "sha256:" + expected.hexdigest()
        with httpx.Client(base_url=server.url, timeout=300) as client:
            # Monolithic: POST then one streamed PUT.
            location = client.post("/v2/mem/big/blobs/uploads/").headers["location"]
            response = client.put(location, params={"digest": digest}, content=pattern_blob(1))
            assert response.status_code == 201, response.text
            # Chunked, into another repository: 256 MiB chunks.
            location = client.post("/v2/mem/chunked/blobs/uploads/").headers["location"]
            offset, pending = 0, bytearray()
            for piece in pattern_blob(1):
                pending += piece
                if len(pending) >= 256 * MiB:
                    response = client.patch(
                        location,
                        content=bytes(pending),
                        headers={"Content-Range": f"{offset}-{offset + len(pending) - 1}"},
                    )
                    assert response.status_code == 202, response.text
                    location, offset, pending = (
                        response.headers["location"],
                        offset + len(pending),
                        bytearray(),
                    )
            assert client.put(location, params={"digest": digest}).status_code == 201
            # Pull both, streamed, and check the bytes.
            for repo in ("mem/big", "mem/chunked"):
                pulled = hashlib.sha256()
                with client.stream("GET", f"/v2/{repo}/blobs/{digest}") as response:
                    assert response.status_code == 200
                    for chunk in response.iter_bytes(8 * MiB):
                        pulled.update(chunk)
                assert "sha256:" + pulled.hexdigest() == digest
        peaks = tree_peak_rss(server.proc.pid)
        report = ", ".join(f"pid {pid}: {rss / MiB:.0f} MiB" for pid, rss in peaks.items())
        print(f"peak RSS per server process: {report}")
        # The whole tree (ASGI server supervisor and worker) counts, not only the worker.
        assert sum(peaks.values()) < PEAK_LIMIT, report
