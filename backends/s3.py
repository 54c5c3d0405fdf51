"""Any S3-compatible object store (AWS S3, SeaweedFS, Ceph RGW, ...), through boto3.

Layout in the bucket, under the normalised prefix (``""`` stays ``""``; ``"a"``, ``"a/"``
and ``"/a/"`` all become ``"a/"``)::

    <prefix><key>                          committed objects, at exactly the engine's key:
                                           metadata (digest=sha256:...) as object tags,
                                           storage class and encryption from the settings
    <prefix><key>  (multipart upload)      a staged upload, in place on its final key
    <prefix>.staging/<key>/tail-<random>   a staged upload's short tail (see s3_staged)

``.staging`` can never collide with an object: no valid key has a segment that starts
with ``.``. ``list`` yields only valid keys, so neither staging nor foreign objects under
the prefix are ever offered to the engine (its garbage collector cannot delete what it
cannot name). Still, give the registry a bucket or prefix of its own: whatever valid key
lies under it is the registry's, and ``list_staged`` reports every unfinished multipart
upload under it (which is how an interrupted ``put`` gets aborted by the engine's expiry).

Metadata travels as object tags on every object, not as ``x-amz-meta-*``: S3 takes user
metadata only when an upload *starts*, and a staged upload learns its digest when it is
committed (copying the object onto itself to add metadata would copy every byte). ``put``
sends the tags with the object; ``commit`` tags it right after completing it.

Writes are all-or-nothing: ``put`` is one PutObject up to ``part_size`` and a multipart
upload beyond (aborted on any error), and a staged upload appears by one
CompleteMultipartUpload. Encryption (SSE) is sent with every write, tails included,
because bucket policies may refuse writes without it; the storage class only with
objects that stay (tails live for minutes, and infrequent-access and archive classes
bill 30 to 180 days per object).

Only this module imports boto3: every botocore error becomes a ``BackendError`` (or
``ObjectNotFound``) in ``_translated``. botocore retries throttling and 5xx answers with
exponential backoff and jitter (``mode="standard"``), each attempt bounded by the connect
and read timeouts, so an unreachable store fails within seconds instead of hanging.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import IO, Any
from urllib.parse import urlencode

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from cargohold.backends.base import BackendError, ObjectInfo, ObjectNotFound, check_key
from cargohold.backends.s3_spool import PartSender, Spool, fill
from cargohold.backends.s3_staged import MIN_PART, S3StagedWriter, StagedUploads

MiB = 1024 * 1024
READ_CHUNK = 1 * MiB
MAX_PART_NUMBER = 10_000  # S3's limit
DELETE_BATCH = 1000  # DeleteObjects' limit per request
STAGING = ".staging/"

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchUpload", "NotFound", "404"})


class _RangeNotSatisfiable(BackendError):
    """A ranged GET that starts at or past the end of the object."""


@contextlib.contextmanager
def _translated(what: str, missing: type[BackendError] = ObjectNotFound) -> Iterator[None]:
    """The one place where boto3/botocore errors become ours; ``missing`` is what a 404 means."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = f"{what}: {code} {error.get('Message', '')}".rstrip()
        if code in _NOT_FOUND:
            raise missing(message) from exc
        if code == "InvalidRange":
            raise _RangeNotSatisfiable(message) from exc
        raise BackendError(message) from exc
    except BotoCoreError as exc:  # unreachable, timed out, retries exhausted, no credentials
        raise BackendError(f"{what}: {exc}") from exc


def _root(prefix: str) -> str:
    stripped = prefix.strip("/")
    return check_key(stripped) + "/" if stripped else ""


def _stream(body: Any, what: str) -> Iterator[bytes]:
    """The rest of an already opened GetObject body, in READ_CHUNK pieces."""
    with contextlib.closing(body), _translated(what):
        while data := body.read(READ_CHUNK):
            yield data


class _Bucket:
    """The bucket's calls on full keys, each with its errors translated (``s3_staged.Bucket``)."""

    def __init__(self, client: Any, name: str, sse_args: dict[str, str], final_args: dict[str, str]) -> None:
        self.client = client
        self.name = name
        self._sse_args = sse_args
        self._final_args = final_args

    # -- objects ---------------------------------------------------------------------------
    def put(
        self,
        target: str,
        body: IO[bytes] | bytes,
        metadata: Mapping[str, str] | None = None,
        final: bool = False,
    ) -> None:
        args = {**(self._final_args if final else self._sse_args)}
        if metadata:
            args["Tagging"] = urlencode(metadata)
        with _translated(f"put {target}"):
            self.client.put_object(Bucket=self.name, Key=target, Body=body, **args)

    def read(self, target: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """GetObject now (a missing key raises here), then the body in READ_CHUNK pieces."""
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"invalid byte range [{start}, {end})")
        if end == start:  # S3 cannot ask for an empty range; a missing object must still raise
            self.head(target)
            return iter(())
        args = {"Bucket": self.name, "Key": target}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            with _translated(f"read {target}"):
                body = self.client.get_object(**args)["Body"]
        except _RangeNotSatisfiable:  # starts at or past the end: nothing to send
            return iter(())
        return _stream(body, f"read {target}")

    def head(self, target: str) -> dict[str, Any]:
        with _translated(f"stat {target}"):
            return self.client.head_object(Bucket=self.name, Key=target)  # type: ignore[no-any-return]

    def size(self, target: str) -> int:
        return int(self.head(target)["ContentLength"])

    def delete_one(self, target: str) -> None:
        with _translated(f"delete {target}"):
            self.client.delete_object(Bucket=self.name, Key=target)

    def delete(self, targets: list[str]) -> list[str]:
        """DeleteObjects, 1,000 keys a request; returns the keys that could not be deleted."""
        failed = []
        for first in range(0, len(targets), DELETE_BATCH):
            batch = targets[first : first + DELETE_BATCH]
            try:
                with _translated(f"delete {len(batch)} objects"):
                    answer = self.client.delete_objects(
                        Bucket=self.name, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True}
                    )
            except BackendError:
                failed.extend(batch)
                continue
            failed.extend(error["Key"] for error in answer.get("Errors", []))
        return failed

    def list(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        """Every object under ``prefix`` as (key, size, modified), page after page."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        with _translated(f"list {prefix!r}"):
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"], item["Size"], item["LastModified"].timestamp()

    def tag(self, target: str, metadata: Mapping[str, str]) -> None:
        tags = [{"Key": name, "Value": value} for name, value in metadata.items()]
        with _translated(f"tag {target}"):
            self.client.put_object_tagging(Bucket=self.name, Key=target, Tagging={"TagSet": tags})

    def presign(self, target: str, expires_seconds: int) -> str:
        params = {"Bucket": self.name, "Key": target}
        with _translated(f"presign {target}"):
            return str(
                self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_seconds)
            )

    def check(self) -> None:
        with _translated(f"bucket {self.name}", missing=BackendError):
            self.client.head_bucket(Bucket=self.name)

    # -- multipart uploads -------------------------------------------------------------------
    def create_upload(self, target: str, metadata: Mapping[str, str] | None = None) -> str:
        args = {**self._final_args, **({"Tagging": urlencode(metadata)} if metadata else {})}
        with _translated(f"start a multipart upload to {target}"):
            return str(self.client.create_multipart_upload(Bucket=self.name, Key=target, **args)["UploadId"])

    def _part(self, target: str, upload_id: str, number: int) -> dict[str, Any]:
        if number > MAX_PART_NUMBER:
            raise BackendError(f"{target}: past S3's {MAX_PART_NUMBER} parts; raise storage.s3.part_size")
        return {"Bucket": self.name, "Key": target, "UploadId": upload_id, "PartNumber": number}

    def upload_part(self, target: str, upload_id: str, number: int, body: IO[bytes]) -> str:
        part = self._part(target, upload_id, number)
        with _translated(f"upload part {number} of {target}"):
            return str(self.client.upload_part(Body=body, **part)["ETag"])

    def copy_part(self, target: str, upload_id: str, number: int, source: str) -> str:
        part = self._part(target, upload_id, number)
        with _translated(f"copy {source} into part {number} of {target}"):
            answer = self.client.upload_part_copy(CopySource={"Bucket": self.name, "Key": source}, **part)
        return str(answer["CopyPartResult"]["ETag"])

    def list_parts(self, target: str, upload_id: str, after: int = 0) -> list[tuple[int, str, int]]:
        """The upload's parts numbered above ``after``, as (number, etag, size)."""
        args = {"Bucket": self.name, "Key": target, "UploadId": upload_id, "PartNumberMarker": after}
        parts = []
        with _translated(f"list the parts of {target}"):
            while True:
                page = self.client.list_parts(**args)
                parts.extend(
                    (part["PartNumber"], part["ETag"], part["Size"]) for part in page.get("Parts", [])
                )
                if not page.get("IsTruncated"):
                    return parts
                args["PartNumberMarker"] = page["NextPartNumberMarker"]

    def complete(self, target: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        listed = [{"PartNumber": number, "ETag": etag} for number, etag in parts]
        with _translated(f"complete the multipart upload to {target}"):
            self.client.complete_multipart_upload(
                Bucket=self.name, Key=target, UploadId=upload_id, MultipartUpload={"Parts": listed}
            )

    def abort(self, target: str, upload_id: str) -> None:
        with contextlib.suppress(ObjectNotFound), _translated(f"abort the multipart upload to {target}"):
            self.client.abort_multipart_upload(Bucket=self.name, Key=target, UploadId=upload_id)

    def uploads(self, prefix: str) -> Iterator[tuple[str, str, float]]:
        """Unfinished multipart uploads under ``prefix`` as (key, upload id, initiated)."""
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.name, Prefix=prefix)
        with _translated(f"list multipart uploads under {prefix!r}"):
            for page in pages:
                for upload in page.get("Uploads", []):
                    yield upload["Key"], upload["UploadId"], upload["Initiated"].timestamp()


class S3Backend:
    """Objects in one bucket under a prefix; staged uploads as multipart uploads in place."""

    name = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        storage_class: str | None = None,
        server_side_encryption: str | None = None,
        sse_kms_key_id: str | None = None,
        part_size: int = 16 * MiB,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
    ) -> None:
        if part_size < MIN_PART:
            raise ValueError(f"part_size must be at least {MIN_PART} bytes (S3's minimum part size)")
        if sse_kms_key_id and server_side_encryption != "aws:kms":
            raise ValueError("sse_kms_key_id needs server_side_encryption 'aws:kms'")
        self.part_size = part_size
        self._root = _root(prefix)
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if path_style else "auto"},
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=64,  # one per engine thread that may be talking to the store
        )
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )
        sse_args = {"ServerSideEncryption": server_side_encryption} if server_side_encryption else {}
        if sse_kms_key_id:
            sse_args["SSEKMSKeyId"] = sse_kms_key_id
        final_args = {**sse_args, **({"StorageClass": storage_class} if storage_class else {})}
        self._bucket = _Bucket(client, bucket, sse_args, final_args)
        self._staged = StagedUploads(self._bucket, self._root, self._root + STAGING, part_size)

    def _target(self, key: str) -> str:
        return self._root + check_key(key)

    # -- objects -----------------------------------------------------------------------------
    def put(self, key: str, chunks: Iterable[bytes], metadata: Mapping[str, str] | None = None) -> int:
        """One PutObject up to part_size, a multipart upload beyond: either appears only whole."""
        target = self._target(key)
        upload_id = ""
        parts: list[tuple[int, str]] = []
        numbers = itertools.count(1)
        sender = PartSender(lambda number, body: self._bucket.upload_part(target, upload_id, number, body))
        spool = Spool()

        def cut() -> Spool:
            nonlocal upload_id, spool
            upload_id = upload_id or self._bucket.create_upload(target, metadata)
            full, spool = spool, Spool()
            parts.extend((number, etag) for number, etag, _size in sender.send(next(numbers), full))
            return spool

        try:
            size = fill(spool, chunks, self.part_size, cut)
            if not upload_id:
                self._bucket.put(target, spool.body(), metadata, final=True)
                return size
            cut()
            parts.extend((number, etag) for number, etag, _size in sender.wait())
            self._bucket.complete(target, upload_id, parts)
            return size
        except BaseException:
            sender.close()  # no part may still be on its way when the upload is aborted
            if upload_id:
                with contextlib.suppress(BackendError):
                    self._bucket.abort(target, upload_id)
            raise
        finally:
            sender.close()
            spool.close()

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        return self._bucket.read(self._target(key), start, end)

    def stat(self, key: str) -> ObjectInfo:
        head = self._bucket.head(self._target(key))
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        self._bucket.delete_one(self._target(key))

    def delete_many(self, keys: Iterable[str]) -> list[str]:
        failed, targets = [], {}
        for key in keys:
            try:
                targets[self._target(key)] = key
            except ValueError:
                failed.append(key)
        return failed + [targets[target] for target in self._bucket.delete(list(targets))]

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for target, size, modified in self._bucket.list(self._root + prefix):
            with contextlib.suppress(ValueError):
                yield ObjectInfo(check_key(target[len(self._root) :]), size, modified)

    # -- staged uploads (backends.s3_staged) -------------------------------------------------
    def create_staged(self, key: str) -> str:
        return self._staged.create(key)

    def open_staged(self, key: str, token: str) -> AbstractContextManager[S3StagedWriter]:
        return self._staged.open(key, token)

    def abort_staged(self, key: str) -> None:
        self._staged.abort(key)

    def list_staged(self) -> Iterator[ObjectInfo]:
        return self._staged.list()

    # -- capabilities --------------------------------------------------------------------------
    def presigned_url(self, key: str, expires_seconds: int) -> str:
        return self._bucket.presign(self._target(key), expires_seconds)

    def check(self) -> None:
        self._bucket.check()
