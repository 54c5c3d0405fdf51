"""Google Cloud Storage backend.

Layout of the bucket under ``prefix`` (``gs://<bucket>/<prefix>``)::

    <key>                                     a committed object, exactly at the engine's key
                                              (e.g. blobs/ab/ab12…), metadata {"digest": …}
    .staging/<key, / as +>/upload             marker: the staged upload of <key> is open
    .staging/<key, / as +>/p0-000000-<nonce>  a part: one piece of at most chunk_size bytes
    .staging/<key, / as +>/p1-000032-<nonce>  32 level-0 parts composed into one (and so on)
    .staging/<key, / as +>/c0-000000-<nonce>  intermediate of a commit of more than 32 parts

``.staging`` can never collide with a key (no key segment may start with a dot) and
``list`` skips it, so staged bytes are invisible until committed. A ``put`` larger than
one piece stages its parts in the same folder and removes them when done.

Objects. ``put`` sends an object of at most ``chunk_size`` bytes in one upload; a larger
one is cut into parts and composed into the key, so readers see the old object or the
whole new one, and memory holds one piece. ``read`` stats the object (the eager request:
a missing key fails in the call), then GETs 1 MiB ranges of that generation, so an
overwrite mid-stream is an error, never a mix of two versions.

Staged uploads (``gcs_staged`` has the protocol). The engine's token names the parts.
``flush`` uploads the buffered piece as a part and returns the token naming all of
them; ``commit`` composes the parts its token names straight into the key, with the
metadata, then removes the folder, marker first. Reopening with an older token is the
truncation: later parts are not named, so they are not part of the upload.

Crash safety: a part is named only once it is whole, and never changes; a token only
names whole parts; nothing a token the engine may hold names is deleted before commit
or abort; the key is written once, by compose, from named parts only. So a crash at any
point leaves the acknowledged token valid, plus at most parts no token names, which
commit, abort and the engine's expiry sweep remove (``list_staged`` lists folders with
or without their marker). A crash after compose but before the marker is gone leaves a
whole object and an upload that commits again to the same bytes.

GCS limits to know: the JSON API composes at most 32 sources per request (hence the
levels); deleted parts are billed under the bucket's soft-delete policy, so a bucket
used only by the registry is best created without one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from cargohold.backends.base import ObjectInfo, check_key
from cargohold.backends.gcs_client import Calls, open_client, open_credentials
from cargohold.backends.gcs_io import BucketIO
from cargohold.backends.gcs_staged import GCSStagedWriter, PartSpool, StagingArea, decode_token

MiB = 1024 * 1024
READ_PIECE = MiB
STAGING = ".staging/"


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return check_key(prefix) + "/" if prefix else ""


class GCSBackend:
    """Objects in one GCS bucket under a prefix; see the module docstring for the layout.

    The keyword arguments are ``cargohold.config.GCSStorage``'s fields, plus ``endpoint``
    (a JSON API base URL, for emulators, without touching ``STORAGE_EMULATOR_HOST``) and
    ``page_size`` (objects per listing request).
    """

    name = "gcs"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        project: str | None = None,
        credentials_file: Path | None = None,
        anonymous: bool = False,
        chunk_size: int = 16 * MiB,
        timeout: float = 60.0,
        max_attempts: int = 5,
        endpoint: str | None = None,
        page_size: int = 1000,
    ) -> None:
        self._prefix = _normalise_prefix(prefix)
        self._page_size = page_size
        self._piece = chunk_size
        creds, found_project = open_credentials(credentials_file, anonymous)
        client = open_client(creds, project or found_project, endpoint)
        self._io = BucketIO(client, bucket, Calls(timeout, max_attempts))
        self._area = StagingArea(self._io, self._prefix + STAGING, chunk_size)

    def close(self) -> None:
        """Release pooled connections (not part of the contract; tests call it)."""
        self._io.close()

    def _name(self, key: str) -> str:
        return self._prefix + check_key(key)

    # -- objects -----------------------------------------------------------------------
    def put(self, key: str, chunks: Iterable[bytes], metadata: Mapping[str, str] | None = None) -> int:
        name = self._name(key)
        head = bytearray()
        rest = iter(chunks)
        for chunk in rest:
            head += chunk
            if len(head) > self._piece:
                break
        else:
            self._io.upload(name, head, metadata)
            return len(head)
        return self._put_in_parts(key, name, head, rest, metadata)

    def _put_in_parts(
        self, key: str, name: str, head: bytearray, rest: Iterator[bytes], metadata: Mapping[str, str] | None
    ) -> int:
        """Larger than one piece: parts in the key's staging folder, composed into ``name``."""
        spool = PartSpool(self._area, key)
        scratch: list[str] = []
        try:
            spool.write(head)
            del head[:]
            for chunk in rest:
                spool.write(chunk)
            spool.seal()
            scratch = self._area.assemble(key, spool.parts, name, metadata)
            return spool.size
        finally:
            folder = self._area.folder(key)
            self._area.delete_quietly([*(folder + part for part in spool.created), *scratch])

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        name = self._name(key)
        stat = self._io.stat(name)
        stop = stat.size if end is None else min(end, stat.size)
        return self._ranges(name, stat.generation, start, stop)

    def _ranges(self, name: str, generation: int, start: int, stop: int) -> Iterator[bytes]:
        while start < stop:
            step = min(READ_PIECE, stop - start)
            yield self._io.download(name, start, start + step, generation)
            start += step

    def stat(self, key: str) -> ObjectInfo:
        stat = self._io.stat(self._name(key))
        return ObjectInfo(key, stat.size, stat.modified)

    def delete(self, key: str) -> None:
        self._io.delete(self._name(key))

    def delete_many(self, keys: Iterable[str]) -> list[str]:
        failed: list[str] = []

        def names() -> Iterator[str]:
            for key in keys:
                try:
                    yield self._name(key)
                except ValueError:
                    failed.append(key)

        self._io.delete_many(names(), on_error=lambda name: failed.append(name[len(self._prefix) :]))
        return failed

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for stat in self._io.iterate(self._prefix + prefix, self._page_size):
            key = stat.name[len(self._prefix) :]
            if not key.startswith(STAGING):
                yield ObjectInfo(key, stat.size, stat.modified)

    # -- staged uploads ----------------------------------------------------------------
    def create_staged(self, key: str) -> str:
        return self._area.create(check_key(key))

    @contextlib.contextmanager
    def open_staged(self, key: str, token: str) -> Iterator[GCSStagedWriter]:
        target = self._name(key)
        parts = decode_token(token)
        self._area.check_open(key)
        writer = GCSStagedWriter(self._area, key, parts, target)
        try:
            yield writer
        finally:
            writer.close()

    def abort_staged(self, key: str) -> None:
        self._area.remove(check_key(key))

    def list_staged(self) -> Iterator[ObjectInfo]:
        return self._area.list()

    # -- capabilities ------------------------------------------------------------------
    def presigned_url(self, key: str, expires_seconds: int) -> str:
        """A v4 signed GET URL; ``BackendError`` when the credentials cannot sign."""
        return self._io.signed_url(self._name(key), expires_seconds)

    def check(self) -> None:
        self._io.check_bucket(self._prefix)
