"""Helpers for the replication tests: push images over HTTP, count bytes on the wire,
write a source registry's replication config, and wait for things to arrive."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.api.oci import (
    ALL_MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    descriptor,
    encode,
    image_manifest,
    push_blob,
    sha256,
    start_upload,
    with_query,
)

ADMIN_TOKEN = "replication-admin-token"
ACCEPT = {"Accept": ", ".join(ALL_MANIFEST_TYPES)}
SIGNATURE_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"


@dataclass
class Image:
    digest: str
    manifest: bytes
    blobs: dict[str, int]  # digest -> size


def push_image(
    client: httpx.Client, repo: str, tag: str | None, layers: list[bytes], label: str = ""
) -> Image:
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "label": label or os.urandom(4).hex()}
    ).encode()
    blobs = {push_blob(client, repo, data): len(data) for data in [config, *layers]}
    doc = image_manifest(descriptor(OCI_CONFIG, config), [descriptor(OCI_LAYER, layer) for layer in layers])
    manifest = encode(doc)
    put_manifest(client, repo, tag or sha256(manifest), manifest, OCI_MANIFEST)
    return Image(sha256(manifest), manifest, blobs)


PIECE = 1 << 20


def seeded_chunks(seed: int, size: int) -> Iterator[bytes]:
    """``size`` reproducible pseudo-random bytes, made ``PIECE`` bytes at a time (never held whole)."""
    rng = random.Random(seed)
    for offset in range(0, size, PIECE):
        yield rng.randbytes(min(PIECE, size - offset))


def push_streamed_blob(
    client: httpx.Client, repo: str, seed: int, size: int, chunk_size: int = 64 << 20
) -> str:
    """Upload ``seeded_chunks(seed, size)`` in streamed PATCHes of ``chunk_size`` bytes (a multiple
    of ``PIECE``), hashing as it goes, then the closing PUT with the digest. No request body is
    ever a bytes object: httpx keeps finished requests alive in reference cycles for a while."""
    assert chunk_size % PIECE == 0
    pieces = seeded_chunks(seed, size)
    hasher = hashlib.sha256()
    location = start_upload(client, repo).headers["location"]

    def body(length: int) -> Iterator[bytes]:
        for piece in itertools.islice(pieces, -(-length // PIECE)):
            hasher.update(piece)
            yield piece

    for offset in range(0, size, chunk_size):
        length = min(chunk_size, size - offset)
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(length),
            "Content-Range": f"{offset}-{offset + length - 1}",
        }
        response = client.patch(location, content=body(length), headers=headers)
        assert response.status_code == 202, f"PATCH {repo}: {response.status_code} {response.text}"
        location = response.headers["location"]
    digest = "sha256:" + hasher.hexdigest()
    response = client.put(with_query(location, {"digest": digest}))
    assert response.status_code == 201, f"PUT {repo} {digest}: {response.status_code} {response.text}"
    return digest


def push_large_image(client: httpx.Client, repo: str, tag: str, seed: int, size: int) -> Image:
    """An image of one large layer, uploaded as a stream (see ``push_streamed_blob``)."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "label": os.urandom(4).hex()}).encode()
    config_digest = push_blob(client, repo, config)
    layer = push_streamed_blob(client, repo, seed, size)
    doc = image_manifest(
        descriptor(OCI_CONFIG, config), [{"mediaType": OCI_LAYER, "digest": layer, "size": size}]
    )
    manifest = encode(doc)
    put_manifest(client, repo, tag, manifest, OCI_MANIFEST)
    return Image(sha256(manifest), manifest, {config_digest: len(config), layer: size})


def push_index(client: httpx.Client, repo: str, tag: str, images: list[Image]) -> Image:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {**descriptor(OCI_MANIFEST, image.manifest), "platform": {"architecture": arch, "os": "linux"}}
            for image, arch in zip(images, ("amd64", "arm64", "riscv64"), strict=False)
        ],
    }
    manifest = encode(doc)
    put_manifest(client, repo, tag, manifest, OCI_INDEX)
    return Image(sha256(manifest), manifest, {})


def push_signature(client: httpx.Client, repo: str, subject: Image, payload: bytes) -> Image:
    push_blob(client, repo, b"{}")
    layer = push_blob(client, repo, payload)
    doc = image_manifest(
        descriptor(OCI_EMPTY, b"{}"),
        [descriptor("application/vnd.dev.cosign.simplesigning.v1+json", payload)],
        artifact_type=SIGNATURE_TYPE,
        subject=descriptor(OCI_MANIFEST if b'"config"' in subject.manifest else OCI_INDEX, subject.manifest),
    )
    manifest = encode(doc)
    put_manifest(client, repo, sha256(manifest), manifest, OCI_MANIFEST)
    return Image(sha256(manifest), manifest, {layer: len(payload)})


def put_manifest(client: httpx.Client, repo: str, reference: str, data: bytes, media_type: str) -> None:
    response = client.put(
        f"/v2/{repo}/manifests/{reference}", content=data, headers={"Content-Type": media_type}
    )
    assert response.status_code == 201, f"PUT {repo}:{reference}: {response.status_code} {response.text}"


def digest_of_tag(base_url: str, repo: str, tag: str) -> str | None:
    response = httpx.head(f"{base_url}/v2/{repo}/manifests/{tag}", headers=ACCEPT, timeout=10)
    return response.headers.get("docker-content-digest") if response.status_code == 200 else None


def has_manifest(base_url: str, repo: str, digest: str) -> bool:
    return (
        httpx.head(f"{base_url}/v2/{repo}/manifests/{digest}", headers=ACCEPT, timeout=10).status_code == 200
    )


def has_blob(base_url: str, repo: str, digest: str) -> bool:
    return httpx.head(f"{base_url}/v2/{repo}/blobs/{digest}", timeout=10).status_code == 200


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 30.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def status(base_url: str) -> dict[str, dict[str, Any]]:
    response = httpx.get(
        f"{base_url}/admin/replication/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return {rule["rule"]: rule for rule in response.json()["rules"]}


def caught_up(base_url: str, rule: str) -> bool:
    """Every job of the rule finished and its dispatcher has read every event."""
    state = status(base_url).get(rule)
    return (
        bool(state)
        and state["jobs"]["pending"] == state["jobs"]["running"] == 0
        and state["lag_seconds"] == 0
    )


def write_config(
    path: Path, targets: list[dict[str, Any]], rules: list[dict[str, Any]], **options: Any
) -> Path:
    replication = {
        "poll_interval": 0.1,
        "backoff": 0.2,
        "backoff_max": 2,
        "max_attempts": 30,
        "chunk_size": "1MiB",
        **options,
        "targets": targets,
        "rules": rules,
    }
    path.write_text(yaml.safe_dump({"admin": {"token": ADMIN_TOKEN}, "replication": replication}))
    return path


class CountingProxy:
    """A TCP proxy on loopback that counts the bytes going upstream (requests, bodies) and back.

    The upstream may be down: a connection then closes at once, as a dead target would.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.sent = 0
        self.received = 0  # bytes the upstream sent back (responses: what a pull downloads)
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_count(self) -> int:
        with self._lock:
            sent, self.sent = self.sent, 0
        return sent

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        try:
            while not self._closing:
                readable, _, _ = select.select([client, upstream], [], [], 0.5)
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    with self._lock:
                        if sock is client:
                            self.sent += len(data)
                        else:
                            self.received += len(data)
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()
