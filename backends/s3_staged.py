"""Staged uploads on S3, staged in place: one multipart upload on the object's final key.

::

    <prefix><key>                          (multipart upload, invisible until completed)
        parts n, n+1, ...                  full parts, 5 MiB <= size <= part_size
    <prefix>.staging/<key>/tail-<random>   the short tail a flush left (< 5 MiB: too small
                                           to be a part unless it is the last one)

``commit`` copies the tail into the last part server-side (UploadPartCopy; no byte passes
through the registry) and CompleteMultipartUpload makes the object appear at once,
whole; nothing is copied to rename it. S3 cannot set user metadata when a multipart
upload completes, so ``metadata`` (the digest) is written as object tags right after.
The engine writes no row for the key until ``commit`` returns, so nothing sees the object
untagged; if tagging fails, the object is deleted again and ``commit`` fails.

The token (what ``flush`` returns and the engine stores) is a few hundred bytes, whatever
the size of the upload: the multipart upload id, the part numbers as ranges, the bytes in
those parts, a hash chain over their ETags, and the tail object's name and size. Parts
past the token (from a request that died before the engine acknowledged it) are simply
not listed when the upload completes, and S3 drops them. A writer never reuses a part
number: it continues after the highest part number S3 lists, so a stale part can never
be mistaken for a new one (SeaweedFS keeps both copies of a re-uploaded part number).
``commit`` checks the parts S3 holds against the token's ETag chain and refuses with
``StagedBusy`` if an overlapping writer changed any of them: S3 would otherwise assemble
bytes the engine never hashed.

Tail objects get a fresh name on every flush, because the engine may reopen the upload
with the previous token if the flush was never acknowledged. The token a writer was
opened with is acknowledged, so once it flushes, the tails of older tokens (and of
requests that died) are garbage: it deletes every tail of the key but the opened token's
and its own. ``commit`` and ``abort_staged`` delete them all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import IO, Protocol

from cargohold.backends.base import BackendError, ObjectInfo, ObjectNotFound, StagedBusy, check_key
from cargohold.backends.s3_spool import PartSender, Spool, fill

MiB = 1024 * 1024
MIN_PART = 5 * MiB  # S3's minimum size of every part but the last
TOKEN_VERSION = 1
_TAIL = re.compile(r"tail-[0-9a-f]{16}")


class Bucket(Protocol):
    """The S3 calls staging needs, on full keys, with their errors already translated."""

    def put(
        self,
        target: str,
        body: IO[bytes] | bytes,
        metadata: Mapping[str, str] | None = None,
        final: bool = False,
    ) -> None: ...

    def read(self, target: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...

    def size(self, target: str) -> int: ...

    def delete(self, targets: list[str]) -> list[str]: ...

    def list(self, prefix: str) -> Iterator[tuple[str, int, float]]: ...

    def create_upload(self, target: str, metadata: Mapping[str, str] | None = None) -> str: ...

    def upload_part(self, target: str, upload_id: str, number: int, body: IO[bytes]) -> str: ...

    def copy_part(self, target: str, upload_id: str, number: int, source: str) -> str: ...

    def list_parts(self, target: str, upload_id: str, after: int = 0) -> list[tuple[int, str, int]]: ...

    def complete(self, target: str, upload_id: str, parts: list[tuple[int, str]]) -> None: ...

    def abort(self, target: str, upload_id: str) -> None: ...

    def uploads(self, prefix: str) -> Iterator[tuple[str, str, float]]: ...

    def tag(self, target: str, metadata: Mapping[str, str]) -> None: ...


def _new_tail_name() -> str:
    return f"tail-{secrets.token_hex(8)}"


def _chain(chain: str, etag: str) -> str:
    return hashlib.sha256(f"{chain}:{etag.strip(chr(34))}".encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Token:
    """What the engine keeps between requests: enough to continue and to check the parts."""

    upload_id: str
    ranges: tuple[tuple[int, int], ...] = ()  # part numbers, ascending, as (first, last)
    size: int = 0  # bytes in those parts
    chain: str = ""  # hash chain over their ETags, in part order
    tail: str | None = None  # name of the tail object
    tail_size: int = 0

    @property
    def last(self) -> int:
        return self.ranges[-1][1] if self.ranges else 0

    def numbers(self) -> Iterator[int]:
        for first, last in self.ranges:
            yield from range(first, last + 1)

    def with_part(self, number: int, etag: str, size: int) -> Token:
        if self.ranges and self.ranges[-1][1] + 1 == number:
            ranges = (*self.ranges[:-1], (self.ranges[-1][0], number))
        else:
            ranges = (*self.ranges, (number, number))
        return replace(self, ranges=ranges, size=self.size + size, chain=_chain(self.chain, etag))

    def encode(self) -> str:
        fields = {"v": TOKEN_VERSION, "u": self.upload_id, "p": self.ranges, "s": self.size, "h": self.chain}
        return json.dumps({**fields, "t": self.tail, "z": self.tail_size}, separators=(",", ":"))

    @classmethod
    def decode(cls, token: str) -> Token:
        try:
            raw = json.loads(token)
            if raw["v"] != TOKEN_VERSION:
                raise ValueError(f"version {raw['v']}")
            ranges = tuple((int(first), int(last)) for first, last in raw["p"])
            tail = raw["t"]
            if tail is not None and not _TAIL.fullmatch(tail):
                raise ValueError(f"tail {tail!r}")
            return cls(str(raw["u"]), ranges, int(raw["s"]), str(raw["h"]), tail, int(raw["z"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"unreadable staged-upload token: {exc}") from exc


class StagedUploads:
    """The staged-upload verbs of ``Backend`` for one bucket and prefix."""

    def __init__(self, bucket: Bucket, root: str, staging: str, part_size: int) -> None:
        self.bucket = bucket
        self.part_size = part_size
        self._root = root
        self._staging = staging
        # Writers open in this process: a second open is refused at once, as a flock would be.
        self._open: set[str] = set()
        self._open_lock = threading.Lock()

    def target(self, key: str) -> str:
        return self._root + check_key(key)

    def tail_key(self, key: str, name: str) -> str:
        return f"{self._staging}{check_key(key)}/{name}"

    def create(self, key: str) -> str:
        return Token(self.bucket.create_upload(self.target(key))).encode()

    @contextlib.contextmanager
    def open(self, key: str, token: str) -> Iterator[S3StagedWriter]:
        target, state = self.target(key), Token.decode(token)
        with self._open_lock:
            if target in self._open:
                raise StagedBusy(key)
            self._open.add(target)
        try:
            with S3StagedWriter(self, key, state, self._next_number(target, state)) as writer:
                yield writer
        finally:
            with self._open_lock:
                self._open.discard(target)

    def _next_number(self, target: str, token: Token) -> int:
        """After every part S3 holds (``ObjectNotFound`` if the upload is gone)."""
        listed = self.bucket.list_parts(target, token.upload_id, after=token.last)
        return max((number for number, _etag, _size in listed), default=token.last) + 1

    def abort(self, key: str) -> None:
        target = self.target(key)
        for upload_key, upload_id, _initiated in self.bucket.uploads(target):
            if upload_key == target:
                self.bucket.abort(target, upload_id)
        failed = self.remove_tails(key)
        if failed:
            raise BackendError(f"staged upload {key}: could not delete {len(failed)} tail objects")

    def remove_tails(self, key: str, keep: Iterable[str | None] = ()) -> list[str]:
        """Delete the key's tail objects but ``keep``; returns the ones that could not be deleted."""
        folder, kept = self.tail_key(key, ""), set(keep)
        names = (tail[len(folder) :] for tail, _size, _modified in self.bucket.list(folder))
        # Only this key's own tails: the folder of "a/b" also holds those of "a/b/c".
        return self.bucket.delete(
            [folder + name for name in names if _TAIL.fullmatch(name) and name not in kept]
        )

    def list(self) -> Iterator[ObjectInfo]:
        """Every key with a multipart upload or tail objects (sessions and crash leftovers alike)."""
        found: dict[str, tuple[int, float]] = {}

        def note(key: str, size: int, modified: float) -> None:
            with contextlib.suppress(ValueError):
                total, latest = found.get(check_key(key), (0, 0.0))
                found[key] = (total + size, max(latest, modified))

        for target, _upload_id, initiated in self.bucket.uploads(self._root):
            note(target[len(self._root) :], 0, initiated)
        for tail, size, modified in self.bucket.list(self._staging):
            note(tail[len(self._staging) :].rpartition("/")[0], size, modified)
        for key, (size, modified) in found.items():
            yield ObjectInfo(key, size, modified)

    def commit(self, key: str, token: Token, metadata: Mapping[str, str]) -> None:
        """Complete the multipart upload with exactly the token's parts (and tail), then tag it."""
        target = self.target(key)
        parts, highest = self._checked_parts(target, token)
        if token.tail is not None:
            number = max(highest, token.last) + 1  # a number no stale part holds
            source = self.tail_key(key, token.tail)
            parts.append((number, self.bucket.copy_part(target, token.upload_id, number, source)))
        if not parts:  # S3 cannot complete an upload without parts
            self.bucket.put(target, b"", metadata, final=True)
            with contextlib.suppress(BackendError):
                self.bucket.abort(target, token.upload_id)
        else:
            self._complete(target, token, parts)
            self._tag(target, metadata)
        with contextlib.suppress(BackendError):  # the object is done; leftovers are list_staged's
            self.remove_tails(key)

    def _checked_parts(self, target: str, token: Token) -> tuple[list[tuple[int, str]], int]:
        """The token's parts as S3 holds them, if their ETags are the ones the writers saw."""
        etags: dict[int, set[str]] = {}
        sizes: dict[int, int] = {}
        for number, etag, size in self.bucket.list_parts(target, token.upload_id):
            etags.setdefault(number, set()).add(etag.strip('"'))
            sizes[number] = size
        parts, chain, size = [], "", 0
        for number in token.numbers():
            if len(etags.get(number, ())) != 1:
                raise StagedBusy(f"{target}: part {number} is missing or was written twice")
            (etag,) = etags[number]
            parts.append((number, etag))
            chain, size = _chain(chain, etag), size + sizes[number]
        if (chain, size) != (token.chain, token.size):
            raise StagedBusy(f"{target}: parts were changed by an overlapping writer")
        return parts, max(etags, default=0)

    def _complete(self, target: str, token: Token, parts: list[tuple[int, str]]) -> None:
        try:
            self.bucket.complete(target, token.upload_id, parts)
        except ObjectNotFound:
            # Gone: completed already if a retry lost the first answer (the key is this upload's own).
            expected = token.size + token.tail_size
            with contextlib.suppress(ObjectNotFound):
                if self.bucket.size(target) == expected:
                    return
            raise

    def _tag(self, target: str, metadata: Mapping[str, str]) -> None:
        if not metadata:
            return
        try:
            self.bucket.tag(target, metadata)
        except BackendError:
            self.bucket.delete([target])  # appear with the metadata or not at all
            raise


class S3StagedWriter:
    """One open staged upload: parts uploaded as the spool fills, the tail kept on flush."""

    def __init__(self, uploads: StagedUploads, key: str, token: Token, next_number: int) -> None:
        self._uploads = uploads
        self._bucket = uploads.bucket
        self._key = key
        self._target = uploads.target(key)
        self._opened = token
        self._flushed = token  # what commit assembles
        self._parts = replace(token, tail=None, tail_size=0)  # parts uploaded so far
        self._next = next_number
        self._sender = PartSender(self._send)
        self._spool = Spool()
        self._stored_tail = token.tail  # the tail object the spool holds, while unchanged
        self._tails = {token.tail}  # tails a token of this writer names: not garbage
        self._ended: BackendError | None = None
        try:
            self._load_tail(token)
        except BaseException:
            self._spool.close()
            raise

    def __enter__(self) -> S3StagedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sender.close()
        self._spool.close()  # unflushed bytes were never acknowledged: they go

    @property
    def size(self) -> int:
        return self._parts.size + self._sender.pending_size + self._spool.size

    def write(self, data: bytes) -> None:
        self._check()
        if data:
            self._stored_tail = None
            fill(self._spool, [data], self._uploads.part_size, self._cut)

    def flush(self) -> str:
        self._check()
        if self._spool.size >= MIN_PART:
            self._cut()
        self._record(self._sender.wait)
        token = self._parts
        if self._spool.size:
            if self._stored_tail is None:
                self._stored_tail = _new_tail_name()
                self._tails.add(self._stored_tail)
                self._bucket.put(self._uploads.tail_key(self._key, self._stored_tail), self._spool.body())
            token = replace(token, tail=self._stored_tail, tail_size=self._spool.size)
        if token != self._flushed:
            self._flushed = token
            if self._opened.tail is not None:  # the tails of older tokens are garbage now
                with contextlib.suppress(BackendError):
                    self._uploads.remove_tails(self._key, keep=self._tails)
        return token.encode()

    def commit(self, metadata: Mapping[str, str]) -> None:
        self._check()
        self._sender.close()  # a part of unflushed bytes must not land while the upload completes
        self._uploads.commit(self._key, self._flushed, metadata)
        self._ended = BackendError(f"staged upload {self._key} is committed")

    def _load_tail(self, token: Token) -> None:
        """The tail goes back into the spool: the next part begins with it."""
        if token.tail is None:
            return
        tail = self._uploads.tail_key(self._key, token.tail)
        self._spool.load(self._bucket.read(tail, 0, token.tail_size))
        if self._spool.size != token.tail_size:
            raise BackendError(f"{tail}: {self._spool.size} bytes, the token says {token.tail_size}")

    def _check(self) -> None:
        if self._ended is not None:
            raise self._ended

    def _cut(self) -> Spool:
        """The spool becomes the next part, sent while a fresh spool fills."""
        number, self._next = self._next, self._next + 1
        full, self._spool = self._spool, Spool()
        self._record(lambda: self._sender.send(number, full))
        return self._spool

    def _send(self, number: int, body: IO[bytes]) -> str:
        return self._bucket.upload_part(self._target, self._parts.upload_id, number, body)

    def _record(self, parts: Callable[[], list[tuple[int, str, int]]]) -> None:
        """Add the parts S3 has stored to the upload; a part that failed ends this writer,
        whose bytes now have a hole (the engine reopens the upload with its last token)."""
        try:
            done = parts()
        except Exception as exc:
            self._ended = BackendError(f"staged upload {self._key}: a part was not stored: {exc}")
            raise
        for number, etag, size in done:
            self._parts = self._parts.with_part(number, etag, size)
