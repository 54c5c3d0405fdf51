"""The few OCI distribution API calls the benchmark makes, written out by hand.

A benchmark client should be thin and predictable, so these are plain httpx calls rather
than a registry library: what is timed is the server, one request shape at a time.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

MIB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
OCTET = {"Content-Type": "application/octet-stream"}


class RegistryError(RuntimeError):
    """A response other than the one the OCI spec prescribes for the request."""


def expect(response: httpx.Response, *codes: int) -> httpx.Response:
    """Fail loudly on an unexpected status: a benchmark that counts errors as work is useless."""
    if response.status_code not in codes:
        body = response.read()[:300]
        raise RegistryError(
            f"{response.request.method} {response.request.url.path} -> {response.status_code}: {body!r}"
        )
    return response


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class BlobFile:
    """Random blob content on disk, with its digest computed before any timing starts."""

    path: Path
    size: int
    digest: str


def write_random_blob(path: Path, size: int) -> BlobFile:
    """Write ``size`` fresh random bytes to ``path``.

    Every push sends never-seen bytes, so no registry can shortcut an upload by deduplicating
    against an earlier one. Generating them up front keeps os.urandom's CPU cost (~1.7 ms/MiB)
    out of the timed section: on a 2-core machine it would otherwise steal from the server.
    """
    hasher = hashlib.sha256()
    written = 0
    with open(path, "wb") as out:
        while written < size:
            block = os.urandom(min(4 * MIB, size - written))
            hasher.update(block)
            out.write(block)
            written += len(block)
    return BlobFile(path, size, "sha256:" + hasher.hexdigest())


def iter_file(path: Path, chunk_size: int = MIB) -> Iterator[bytes]:
    """Stream a file in chunks so a multi-GiB request body is never held in memory."""
    with open(path, "rb") as src:
        while chunk := src.read(chunk_size):
            yield chunk


def start_upload(client: httpx.Client, repo: str) -> str:
    """POST a new upload session and return its Location (relative or absolute, both work)."""
    response = expect(client.post(f"/v2/{repo}/blobs/uploads/"), 202)
    return response.headers["location"]


def with_digest(location: str, digest: str) -> httpx.URL:
    """Add ``digest`` to an upload Location, keeping its own query (Distribution's ``_state``).

    Needed because httpx 0.28 replaces, rather than extends, a URL's query with ``params=``.
    """
    return httpx.URL(location).copy_merge_params({"digest": digest})


def push_monolithic(client: httpx.Client, repo: str, blob: BlobFile) -> None:
    """POST, then one PUT carrying the whole body, streamed from the file."""
    location = start_upload(client, repo)
    headers = {**OCTET, "Content-Length": str(blob.size)}
    response = client.put(with_digest(location, blob.digest), content=iter_file(blob.path), headers=headers)
    expect(response, 201)


def push_chunked(client: httpx.Client, repo: str, blob: BlobFile, chunk_size: int) -> None:
    """POST, one PATCH with Content-Range per chunk, then a closing PUT with the digest."""
    location = start_upload(client, repo)
    offset = 0
    with open(blob.path, "rb") as src:
        while offset < blob.size:
            chunk = src.read(chunk_size)
            end = offset + len(chunk) - 1
            headers = {**OCTET, "Content-Range": f"{offset}-{end}", "Content-Length": str(len(chunk))}
            location = expect(client.patch(location, content=chunk, headers=headers), 202).headers["location"]
            offset += len(chunk)
    expect(client.put(with_digest(location, blob.digest), headers={"Content-Length": "0"}), 201)


def pull_blob(base_url: str, repo: str, digest: str, verify: bool = False, max_redirects: int = 3) -> int:
    """GET a blob, stream it into a reused buffer and discard it; return the byte count.

    Uses http.client's ``readinto`` rather than httpx: on this machine that reads ~2 GB/s,
    while httpx's ``iter_raw`` manages ~0.6 GB/s and would cap the measurement below what
    Distribution serves. Hashing also costs the client ~2 GB/s, so callers verify once
    (``verify=True``) outside the timed runs and only count bytes in them.
    """
    url = httpx.URL(f"{base_url}/v2/{repo}/blobs/{digest}")
    hasher = hashlib.sha256() if verify else None
    buffer = memoryview(bytearray(4 * MIB))
    for _ in range(max_redirects + 1):
        conn = http.client.HTTPConnection(url.host, url.port, timeout=120)
        try:
            conn.request("GET", url.raw_path.decode())
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                url = url.join(response.getheader("location", ""))
                continue
            if response.status != 200:
                raise RegistryError(f"GET {url.path} -> {response.status}: {response.read(300)!r}")
            received = 0
            while n := response.readinto(buffer):
                received += n
                if hasher is not None:
                    hasher.update(buffer[:n])
        finally:
            conn.close()
        if hasher is not None and "sha256:" + hasher.hexdigest() != digest:
            raise RegistryError(f"pulled blob does not match {digest}")
        return received
    raise RegistryError(f"more than {max_redirects} redirects for {digest}")


def push_bytes(client: httpx.Client, repo: str, data: bytes, digest: str) -> None:
    """Upload a small blob the way docker does: HEAD first, then POST + PUT if missing."""
    if client.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
        return
    location = start_upload(client, repo)
    expect(client.put(with_digest(location, digest), content=data, headers=OCTET), 201)


@dataclass(frozen=True)
class SmallImage:
    """An image of a few unique small layers, a config and its manifest, all in memory."""

    layers: list[bytes]
    config: bytes
    manifest: bytes

    @classmethod
    def random(cls, layer_count: int, layer_size: int) -> SmallImage:
        layers = [os.urandom(layer_size) for _ in range(layer_count)]
        diff_ids = [sha256_digest(layer) for layer in layers]
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "config": {"Labels": {"bench.nonce": os.urandom(8).hex()}},
            }
        ).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": sha256_digest(layer), "size": len(layer)}
                for layer in layers
            ],
        }
        return cls(layers, config, json.dumps(manifest).encode())

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    def push_blobs(self, client: httpx.Client, repo: str) -> None:
        for blob in [*self.layers, self.config]:
            push_bytes(client, repo, blob, sha256_digest(blob))

    def put_manifest(self, client: httpx.Client, repo: str, reference: str) -> None:
        headers = {"Content-Type": OCI_MANIFEST}
        expect(client.put(f"/v2/{repo}/manifests/{reference}", content=self.manifest, headers=headers), 201)

    def push(self, client: httpx.Client, repo: str, tag: str) -> None:
        self.push_blobs(client, repo)
        self.put_manifest(client, repo, tag)


def list_all_tags(client: httpx.Client, repo: str, page_size: int, max_pages: int = 1000) -> tuple[int, int]:
    """Walk the tag list through its Link pagination; return (tag count, pages fetched)."""
    url: str | None = f"/v2/{repo}/tags/list?n={page_size}"
    tags = pages = 0
    while url is not None and pages < max_pages:
        response = expect(client.get(url), 200)
        tags += len(response.json().get("tags") or [])
        pages += 1
        url = response.links.get("next", {}).get("url")
    return tags, pages
