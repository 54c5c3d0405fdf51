"""The requests the GCS backend makes to its bucket, by full object name.

Every call goes through :meth:`gcs_client.Calls.run` (retries, timeouts, our errors).
"""

from __future__ import annotations

import base64
import io
import json
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import google.auth.transport.requests
import google_crc32c
from google.api_core import exceptions as api_exceptions
from google.auth.credentials import Signing
from google.cloud import storage

from cargohold.backends.base import BackendError, ObjectNotFound
from cargohold.backends.gcs_client import Calls

DELETE_THREADS = 16
# The JSON API takes up to 32 sources per compose request.
MAX_COMPOSE_SOURCES = 32
# Checksums are computed over pieces of this size (the C extension wants bytes).
CHECKSUM_PIECE = 1024 * 1024


# -- objects ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ObjectStat:
    name: str
    size: int
    modified: float
    generation: int


class _MultipartBody(io.RawIOBase):
    """A multipart/related upload body read straight from the caller's buffer.

    The SDK's multipart upload holds three copies of the data (read, then concatenated
    twice) and its resumable upload one, plus a request; this streams the one request
    from the piece already in memory, so an upload costs no copy at all.
    """

    def __init__(self, resource: dict[str, Any], data: memoryview) -> None:
        self.boundary = secrets.token_hex(16)
        separator = f"--{self.boundary}\r\n".encode()
        head = (
            separator
            + b"content-type: application/json; charset=UTF-8\r\n\r\n"
            + json.dumps(resource).encode()
            + b"\r\n"
            + separator
            + b"content-type: application/octet-stream\r\n\r\n"
        )
        self._segments = [memoryview(head), data, memoryview(f"\r\n--{self.boundary}--\r\n".encode())]
        self._length = sum(len(segment) for segment in self._segments)
        self._pos = 0

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def tell(self) -> int:  # with __len__, lets requests send a Content-Length, not chunks
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        wanted = self._length - self._pos if size is None or size < 0 else size
        out = bytearray()
        offset = 0
        for segment in self._segments:
            if len(out) >= wanted:
                break
            if self._pos < offset + len(segment):
                begin = self._pos - offset
                piece = segment[begin : begin + wanted - len(out)]
                out += piece
                self._pos += len(piece)
            offset += len(segment)
        return bytes(out)


def _crc32c(data: memoryview) -> str:
    crc = 0
    for start in range(0, len(data), CHECKSUM_PIECE):
        crc = google_crc32c.extend(crc, bytes(data[start : start + CHECKSUM_PIECE]))
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def _stat_of(blob: storage.Blob) -> ObjectStat:
    updated = blob.updated.timestamp() if blob.updated is not None else 0.0
    return ObjectStat(blob.name, int(blob.size or 0), updated, int(blob.generation or 0))


class BucketIO:
    """The requests this backend makes to its bucket, by full object name."""

    def __init__(self, client: storage.Client, bucket: str, calls: Calls) -> None:
        self._client = client
        self._bucket = client.bucket(bucket)
        self._calls = calls
        self.bucket_name = bucket

    def close(self) -> None:
        self._client.close()

    def check_bucket(self, prefix: str) -> None:
        """List one object: the bucket answers, and we hold the permission the registry uses.

        Not a bucket GET: ``storage.buckets.get`` is not in roles/storage.objectAdmin, the
        least a registry needs, and a probe must not fail a working deployment.
        """
        try:
            self.list_page(prefix, None, 1)
        except ObjectNotFound:
            raise BackendError(f"GCS bucket {self.bucket_name!r} does not exist") from None

    def upload(
        self,
        name: str,
        data: bytes | bytearray | memoryview,
        metadata: Mapping[str, str] | None = None,
        if_generation_match: int | None = None,
    ) -> int:
        """Write ``data`` as object ``name`` in one atomic request; returns its generation.

        One multipart request of the JSON API, streamed from ``data``, with its CRC32C
        for the server to check. ``if_generation_match=0``: only if the name is free.
        """
        with memoryview(data) as view:  # released at once: the caller may resize ``data``
            resource: dict[str, Any] = {
                "name": name,
                "contentType": "application/octet-stream",
                "crc32c": _crc32c(view),
            }
            if metadata:
                resource["metadata"] = dict(metadata)
            params = {"uploadType": "multipart", "fields": "generation", "prettyPrint": "false"}
            if if_generation_match is not None:
                params["ifGenerationMatch"] = str(if_generation_match)
            url = f"{self._client.api_endpoint}/upload/storage/v1/b/{quote(self.bucket_name, safe='')}/o"

            def attempt() -> int:
                body = _MultipartBody(resource, view)
                headers = {"Content-Type": f'multipart/related; boundary="{body.boundary}"'}
                response = self._client._http.post(
                    url, params=params, data=body, headers=headers, timeout=self._calls.timeout
                )
                if response.status_code != 200:
                    raise api_exceptions.from_http_response(response)
                return int(response.json()["generation"])

            return self._calls.run(f"upload {name}", attempt)

    def download(self, name: str, start: int, end: int, generation: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``name`` (of that ``generation``, if given); one request."""
        blob = self._bucket.blob(name, generation=generation)
        return self._calls.run(
            f"read {name}",
            blob.download_as_bytes,
            start=start,
            end=end - 1,
            raw_download=True,
            checksum=None,  # a range cannot be checked against the object's checksum
            timeout=self._calls.timeout,
            retry=None,
        )

    def fetch(self, name: str) -> bytes:
        """A whole small object (a marker), checked against its CRC32C, in one request."""
        blob = self._bucket.blob(name)
        return self._calls.run(
            f"read {name}", blob.download_as_bytes, checksum="crc32c", timeout=self._calls.timeout, retry=None
        )

    def stat(self, name: str) -> ObjectStat:
        blob = self._bucket.blob(name)
        self._calls.run(f"stat {name}", blob.reload, timeout=self._calls.timeout, retry=None)
        return _stat_of(blob)

    def delete(self, name: str) -> None:
        """Idempotent: an object that is already gone is not an error."""
        try:
            blob = self._bucket.blob(name)
            self._calls.run(f"delete {name}", blob.delete, timeout=self._calls.timeout, retry=None)
        except ObjectNotFound:
            pass

    def delete_many(self, names: Iterable[str], on_error: Callable[[str], None]) -> None:
        """Delete in parallel (fake-gcs-server has no batch endpoint); failures go to ``on_error``."""

        def one(name: str) -> None:
            try:
                self.delete(name)
            except BackendError:
                on_error(name)

        with ThreadPoolExecutor(DELETE_THREADS, thread_name_prefix="gcs-delete") as pool:
            batch: list[str] = []
            for name in names:
                batch.append(name)
                if len(batch) >= 1000:
                    list(pool.map(one, batch))
                    batch = []
            list(pool.map(one, batch))

    def list_page(
        self, prefix: str, token: str | None, page_size: int
    ) -> tuple[list[ObjectStat], str | None]:
        """One page of a listing; paging by token so that a failed page can be retried."""

        def attempt() -> tuple[list[ObjectStat], str | None]:
            blobs = self._client.list_blobs(
                self._bucket,
                prefix=prefix,
                page_token=token,
                page_size=page_size,
                fields="items(name,size,updated,generation),nextPageToken",
                timeout=self._calls.timeout,
                retry=None,
            )
            page = next(blobs.pages, None)
            stats = [_stat_of(blob) for blob in page] if page is not None else []
            return stats, blobs.next_page_token

        return self._calls.run(f"list {prefix or '/'}", attempt)

    def iterate(self, prefix: str, page_size: int = 1000) -> Iterator[ObjectStat]:
        token: str | None = None
        while True:
            page, token = self.list_page(prefix, token, page_size)
            yield from page
            if not token:
                return

    def compose(self, name: str, sources: list[str], metadata: Mapping[str, str] | None = None) -> None:
        """Object ``name`` becomes the concatenation of ``sources`` (at most 32), atomically."""
        if not 0 < len(sources) <= MAX_COMPOSE_SOURCES:
            raise ValueError(f"compose takes 1 to {MAX_COMPOSE_SOURCES} sources, not {len(sources)}")
        blob = self._bucket.blob(name)
        blob.content_type = "application/octet-stream"
        if metadata:
            blob.metadata = dict(metadata)
        parts = [self._bucket.blob(source) for source in sources]
        self._calls.run(f"compose {name}", blob.compose, parts, timeout=self._calls.timeout, retry=None)

    def signed_url(self, name: str, expires_seconds: int) -> str:
        """A v4 signed GET URL: signed locally with a key, or through IAM for a VM's identity."""
        creds = self._client._credentials
        extra: dict[str, Any] = {}
        if not isinstance(creds, Signing):
            email = getattr(creds, "service_account_email", None)
            if not isinstance(email, str) or "@" not in email:
                raise BackendError(
                    f"GCS presigned URLs need credentials that can sign, not {type(creds).__name__} "
                    "(anonymous, e.g. an emulator, or user credentials): use a service account key "
                    "file or a service account identity allowed iam.serviceAccounts.signBlob, or "
                    "turn storage.redirect_pulls off"
                )
            if not creds.valid:
                request = google.auth.transport.requests.Request()
                self._calls.run("refresh GCS credentials", creds.refresh, request)
            extra = {"service_account_email": email, "access_token": creds.token}
        blob = self._bucket.blob(name)
        return self._calls.run(
            f"sign a URL for {name}",
            blob.generate_signed_url,
            version="v4",
            expiration=timedelta(seconds=expires_seconds),
            method="GET",
            **extra,
        )
