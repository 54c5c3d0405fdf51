"""Azure Blob Storage backend (block blobs).

Layout of the container under ``prefix``::

    <key>                        a committed object, exactly at the engine's key (e.g.
                                 blobs/ab/ab12…), metadata {digest}. While the staged upload
                                 that will become it is in progress, the name holds only
                                 uncommitted blocks: no blob exists for reads or listings
    .staging/<key, / as +>       the marker of a staged upload in progress: an empty blob,
                                 so that list_staged finds uploads and abort knows one began

``.staging`` can never collide with a key: no key segment may start with a dot, and
``list`` skips it.

Objects. ``put`` sends an object smaller than ``block_size`` in one Put Blob; a larger one
as blocks staged on the key and one Put Block List, so readers see the old object or the
whole new one, and memory holds one block. ``read`` sends one (ranged) GET in the call, so
a missing key or a dead store fails there, and streams its body in 1 MiB pieces: one
version of the object, one round trip, about 2 MiB of memory (``azure_io.open_range``).

Staged uploads stage blocks on the final blob and commit them there (``azure_staged``
draws the block chain and the token)::

    create_staged(key)   .staging/<key+>  Put Blob (empty), If-None-Match: *  -> "azb1:0:000…"
    write(...)           <key>            Put Block b1, b2 … (each block-size buffer, when full)
    flush()              <key>            Put Block (what is buffered)        -> "azb1:<size>:<bn>"
    open_staged(key, t)  .staging/<key+>  Get Blob Properties: still in progress?
                         <key>            Get Block List: walk t's chain back to its root
    commit({digest})     <key>            Put Block List [chain], If-None-Match: *  -> whole object
                         .staging/<key+>  Delete
    abort_staged(key)    <key>            Put Block List [], If-None-Match: *, then Delete If-Match:
                                          every uncommitted block is discarded, an object never
                         .staging/<key+>  Delete

Commit never copies a byte (Azure commits only blocks staged on the same blob, and these
are), never exposes a partial object (uncommitted blocks are unreadable and unlisted), and
is create-only: a second writer that commits the same upload gets ``StagedBusy`` (a second
writer in the same process is refused at ``open_staged`` already).

Crash safety. A block is durable once Put Block returns, and the engine stores the token
with its acknowledgement, so a crash loses at most what the client was not told of:
blocks staged after the acknowledged token hang off another branch of the chain and are
discarded by the commit (or by Azure after a week). A crash after the commit but before
the marker is removed leaves a whole object and a marker: reopening the upload says it is
gone (its blocks are committed), so the engine starts over instead of retrying a commit
that can only be refused; ``abort_staged`` removes only the marker (its empty Put Block
List is refused because the object exists), and the collector's leak sweep decides about
the object. A crash inside ``abort_staged`` leaves the marker, so the expiry sweep retries.

Limits: 50,000 blocks per blob (each flush ends a block, so a push may have at most that
many chunks), 4,000 MiB per block (``block_size``), and uncommitted blocks expire after 7
days (``uploads.expiry_hours`` must stay below that).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.storage.blob import BlobBlock, BlobProperties, BlobSasPermissions, generate_blob_sas

from cargohold.backends.azure_io import (
    BlockSink,
    MiB,
    RangeNotSatisfiable,
    Unreachable,
    account_key_of,
    azure_errors,
    open_range,
    open_service,
)
from cargohold.backends.azure_staged import ROOT, AzureStagedWriter, BlockChain, encode_token
from cargohold.backends.base import BackendError, ObjectInfo, ObjectNotFound, StagedBusy, check_key

log = logging.getLogger("cargohold.backends.azure")

STAGING = ".staging/"


def _is_key(name: str) -> bool:
    try:
        check_key(name)
    except ValueError:
        return False
    return True


class AzureBackend:
    """Objects are block blobs named ``<prefix>/<key>`` in one container."""

    name = "azure"
    list_page_size = 5000  # the most Azure returns per page
    delete_batch_size = 256  # the most one blob batch request may hold
    delete_threads = 8  # deletes in flight when the store refuses batches

    def __init__(
        self,
        container: str,
        prefix: str = "",
        connection_string: str | None = None,
        account_url: str | None = None,
        account_key: str | None = None,
        block_size: int = 16 * MiB,
        timeout: float = 60.0,
        max_attempts: int = 5,
    ) -> None:
        prefix = prefix.strip("/")
        self._root = f"{check_key(prefix)}/" if prefix else ""
        self.container_name = container
        self.block_size = block_size
        self._service = open_service(connection_string, account_url, account_key, timeout, max_attempts)
        self.container = self._service.get_container_client(container)
        self._account_key = account_key_of(self._service, account_key)
        self._claims: set[str] = set()  # staged uploads open in this process
        self._claims_lock = threading.Lock()

    # -- names ---------------------------------------------------------------------------
    def _name(self, key: str) -> str:
        return self._root + check_key(key)

    def _marker_name(self, key: str) -> str:
        return self._root + STAGING + check_key(key).replace("/", "+")

    # -- objects -------------------------------------------------------------------------
    def put(self, key: str, chunks: Iterable[bytes], metadata: Mapping[str, str] | None = None) -> int:
        blob = self.container.get_blob_client(self._name(key))
        what = f"put {key}"
        chain = BlockChain()
        sink = BlockSink(blob, self.block_size, what, namer=chain.name)
        for chunk in chunks:
            sink.write(chunk)
        size = chain.offset + sink.buffered
        if not chain.ids:
            data = bytes(sink.buffered_view())  # the SDK sends only bytes in one Put Blob
            sink.release()
            with azure_errors(what):
                blob.upload_blob(data, length=size, overwrite=True, metadata=dict(metadata or {}))
            return size
        sink.stage_buffered()
        with azure_errors(what):
            blob.commit_block_list(
                [BlobBlock(block_id) for block_id in chain.ids], metadata=dict(metadata or {})
            )
        return size

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """One GET, sent here, so a missing key or a dead store fails this call."""
        name = self._name(key)
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"invalid range [{start}, {end})")
        try:
            if end == start:
                raise RangeNotSatisfiable(key)  # nothing to fetch: only existence is checked
            return open_range(self.container.get_blob_client(name), start, end, key)
        except RangeNotSatisfiable:
            self.stat(key)  # at or past the end, as a file: nothing to read, but it must exist
            return iter(())

    def stat(self, key: str) -> ObjectInfo:
        props = self._properties(self._name(key), key)
        if props is None:
            raise ObjectNotFound(key)
        return ObjectInfo(key, props.size, props.last_modified.timestamp())

    def delete(self, key: str) -> None:
        self._delete_name(self._name(key), f"delete {key}")

    def delete_many(self, keys: Iterable[str]) -> list[str]:
        """Blob batches of 256 deletes; one by one (a few at a time) where batches are refused."""
        failed: list[str] = []
        named: list[tuple[str, str]] = []
        for key in keys:
            if _is_key(key):
                named.append((key, self._root + key))
            else:
                failed.append(key)
        for at in range(0, len(named), self.delete_batch_size):
            try:
                failed += self._delete_batch(named[at : at + self.delete_batch_size])
            except Unreachable:
                # Every further request would wait out the same retries: report the rest.
                failed += [key for key, _ in named[at:]]
                break
        return failed

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with azure_errors(f"list {prefix!r}"):
            for item in self.container.list_blobs(
                name_starts_with=self._root + prefix, results_per_page=self.list_page_size
            ):
                key = item.name[len(self._root) :]
                # Staged uploads are not objects; a name no key can have was not written by us.
                if key.startswith(STAGING) or not _is_key(key):
                    continue
                yield ObjectInfo(key, item.size, item.last_modified.timestamp())

    # -- staged uploads ------------------------------------------------------------------
    def create_staged(self, key: str) -> str:
        marker = self.container.get_blob_client(self._marker_name(key))
        with azure_errors(f"create staged upload {key}"):
            marker.upload_blob(b"", overwrite=False)
        return encode_token(0, ROOT)

    @contextlib.contextmanager
    def open_staged(self, key: str, token: str) -> Iterator[AzureStagedWriter]:
        what = f"staged upload {key}"
        with self._claim(key):
            if self._properties(self._marker_name(key), what) is None:
                raise ObjectNotFound(f"{what} was committed or aborted")
            blob = self.container.get_blob_client(self._name(key))
            yield AzureStagedWriter.open(self, key, blob, token)

    def abort_staged(self, key: str) -> None:
        what = f"abort staged upload {key}"
        if self._properties(self._marker_name(key), what) is None:
            return  # never started, or already gone (the marker goes last)
        self._discard_blocks(key, what)
        self._delete_name(self._marker_name(key), what)

    def list_staged(self) -> Iterator[ObjectInfo]:
        """Every marker; the size is what is staged on the key (one Get Block List each)."""
        start = self._root + STAGING
        with azure_errors("list staged uploads"):
            for item in self.container.list_blobs(
                name_starts_with=start, results_per_page=self.list_page_size
            ):
                key = item.name[len(start) :].replace("+", "/")
                if _is_key(key):
                    yield ObjectInfo(key, self._staged_bytes(key), item.last_modified.timestamp())

    def forget_staged(self, key: str) -> None:
        """After a commit: the object is whole, so a failure here leaves only a marker that
        ``abort_staged`` removes safely later; it must not fail the commit."""
        try:
            self._delete_name(self._marker_name(key), f"staged upload {key}")
        except BackendError as exc:
            log.warning("committed %s but could not remove its staging marker: %s", key, exc)

    # -- capabilities --------------------------------------------------------------------
    def check(self) -> None:
        with azure_errors(f"container {self.container_name}"):
            self.container.get_container_properties()

    def presigned_url(self, key: str, expires_seconds: int) -> str:
        """A read-only SAS for one blob, signed locally with the account key."""
        name = self._name(key)
        if expires_seconds <= 0:
            raise ValueError("expires_seconds must be positive")
        if not self._account_key:
            raise BackendError("presigned URLs need the storage account key (AccountKey or account_key)")
        url = self.container.get_blob_client(name).url.split("?", 1)[0]
        sas = generate_blob_sas(
            account_name=self._service.account_name,
            container_name=self.container_name,
            blob_name=name,
            account_key=self._account_key,
            permission=BlobSasPermissions(read=True),
            expiry=datetime.now(UTC) + timedelta(seconds=expires_seconds),
            protocol="https" if url.startswith("https:") else None,
        )
        return f"{url}?{sas}"

    # -- internals -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _claim(self, key: str) -> Iterator[None]:
        """Writers in this process are refused at once; across processes, the create-only
        commit lets one of them win (the engine serialises them anyway)."""
        with self._claims_lock:
            if key in self._claims:
                raise StagedBusy(f"staged upload {key} is open in this process")
            self._claims.add(key)
        try:
            yield
        finally:
            with self._claims_lock:
                self._claims.discard(key)

    def _properties(self, name: str, what: str) -> BlobProperties | None:
        try:
            with azure_errors(what):
                return self.container.get_blob_client(name).get_blob_properties()
        except ObjectNotFound:
            return None

    def _staged_bytes(self, key: str) -> int:
        try:
            with azure_errors(f"staged upload {key}"):
                _committed, uncommitted = self.container.get_blob_client(self._name(key)).get_block_list(
                    "uncommitted"
                )
        except ObjectNotFound:
            return 0
        return sum(block.size for block in uncommitted)

    def _discard_blocks(self, key: str, what: str) -> None:
        """Azure cannot delete uncommitted blocks, but a Put Block List drops every block it
        does not name: commit an empty list, create-only so that an object already at the key
        is never replaced, then delete that empty blob (only it, by its ETag)."""
        blob = self.container.get_blob_client(self._name(key))
        try:
            with azure_errors(what, staged=True):
                result = blob.commit_block_list([], match_condition=MatchConditions.IfMissing)
        except StagedBusy:
            return  # an object is there: a commit that crashed before removing its marker
        with contextlib.suppress(ObjectNotFound, StagedBusy), azure_errors(what, staged=True):
            blob.delete_blob(etag=result["etag"], match_condition=MatchConditions.IfNotModified)

    def _delete_name(self, name: str, what: str) -> None:
        with contextlib.suppress(ObjectNotFound), azure_errors(what):
            self.container.get_blob_client(name).delete_blob(delete_snapshots="include")

    def _delete_batch(self, chunk: list[tuple[str, str]]) -> list[str]:
        try:
            with azure_errors("batch delete"):
                responses = list(
                    self.container.delete_blobs(
                        *(name for _, name in chunk), raise_on_any_failure=False, delete_snapshots="include"
                    )
                )
        except Unreachable:
            raise
        except BackendError as exc:
            # The store refused the batch itself (accounts with a hierarchical namespace, some
            # proxies and emulators): delete one by one.
            log.info("blob batch refused (%s); deleting %d blobs one by one", exc, len(chunk))
            return self._delete_each([key for key, _ in chunk])
        return [key for (key, _), response in zip(chunk, responses, strict=True) if not _deleted(response)]

    def _delete_each(self, keys: list[str]) -> list[str]:
        def attempt(key: str) -> str | None:
            try:
                self.delete(key)
            except BackendError:
                return key
            return None

        with ThreadPoolExecutor(self.delete_threads) as pool:
            return [key for key in pool.map(attempt, keys) if key is not None]


def _deleted(response: Any) -> bool:
    """A sub-response of a blob batch: deleted now, or already gone."""
    if response.status_code == 202:
        return True
    return response.status_code == 404 and response.headers.get("x-ms-error-code") == "BlobNotFound"
