"""Staged uploads on GCS: immutable parts named in the engine's token, composed on commit.

A staged upload of key ``K`` is the folder ``<prefix>.staging/<K with / as +>/`` (the
whole layout is drawn in ``cargohold.backends.gcs``). It holds a marker object
``upload`` (written by ``create_staged``, removed first by commit and abort) and
parts: whole objects, each written once under a name no other writer can pick (its
level, a sequence number and a random nonce) and never changed. The *token* that
``flush`` returns, and the engine stores with the acknowledged size, lists the parts
in order::

    {"v":1,"parts":[["p1-000000-1f2e3d4c",536870912],["p0-000032-9a8b7c6d",16777216]]}

So the store keeps no record of its own: bytes a writer staged after the token the
engine holds (a request that died, an unacknowledged flush, an overlapping writer)
are simply not named by it, and ``commit`` composes exactly what the token names.
Overlapping writers cannot corrupt each other: each produces its own parts and its
own token, and the engine's compare-and-swap on the session row keeps one.

Tokens stay small: when 32 parts of one level end the list, they are composed into one
part of the next level (a base-32 counter), so a token names at most 31 parts per
level, about 2 KiB for a 10 GiB layer in 16 MiB pieces. The sources stay until commit
or abort (an older token, still the acknowledged one, may name them).

Why not a GCS resumable session per upload (staging in place): a session persists
only multiples of 256 KiB before it is finalised, so a 7 MiB + 5 byte PATCH could not be
made durable; bytes sent past the acknowledged offset by a request that died cannot
be taken back; and fake-gcs-server finalises a session when asked for its status.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from cargohold.backends.base import BackendError, ObjectInfo, ObjectNotFound
from cargohold.backends.gcs_client import PreconditionFailed
from cargohold.backends.gcs_io import MAX_COMPOSE_SOURCES, BucketIO

log = logging.getLogger("cargohold.backends.gcs")

MARKER = "upload"
TOKEN_VERSION = 1
COMPACT_AT = MAX_COMPOSE_SOURCES
_PART_NAME = re.compile(r"p([0-9])-[0-9]{6,}-[0-9a-f]{8}")


@dataclass(frozen=True, slots=True)
class Part:
    name: str  # relative to the upload's folder: p<level>-<sequence>-<nonce>
    size: int

    @property
    def level(self) -> int:
        return int(self.name[1])


def part_name(level: int, sequence: int) -> str:
    return f"p{level}-{sequence:06d}-{secrets.token_hex(4)}"


def encode_token(parts: Iterable[Part]) -> str:
    record = {"v": TOKEN_VERSION, "parts": [[part.name, part.size] for part in parts]}
    return json.dumps(record, separators=(",", ":"))


def decode_token(token: str) -> tuple[Part, ...]:
    """The parts a token names; a token we did not write is refused, never trusted."""
    try:
        record = json.loads(token)
        if record["v"] != TOKEN_VERSION:
            raise ValueError(f"version {record['v']!r}")
        parts = tuple(Part(name, size) for name, size in record["parts"])
        if not all(_PART_NAME.fullmatch(p.name) and type(p.size) is int and p.size >= 0 for p in parts):
            raise ValueError("bad part")
        return parts
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"not a GCS staged-upload token: {exc}") from exc


class StagingArea:
    """The ``.staging/`` folder of the bucket: one sub-folder per staged upload."""

    def __init__(self, io: BucketIO, root: str, piece: int) -> None:
        self.io = io
        self.root = root
        self.piece = piece

    def folder(self, key: str) -> str:
        return f"{self.root}{key.replace('/', '+')}/"  # '+' is never in a key: one segment

    def create(self, key: str) -> str:
        nonce = secrets.token_hex(8).encode()
        marker = self.folder(key) + MARKER
        try:
            self.io.upload(marker, nonce, if_generation_match=0)
        except PreconditionFailed:
            # A retried create whose first attempt landed finds its own nonce there.
            if self.io.fetch(marker) != nonce:
                raise BackendError(f"a staged upload of {key} exists already") from None
        return encode_token(())

    def check_open(self, key: str) -> None:
        """The marker is there: the upload was neither committed nor aborted."""
        try:
            self.io.stat(self.folder(key) + MARKER)
        except ObjectNotFound:
            raise ObjectNotFound(f"no staged upload of {key}") from None

    def upload_part(self, key: str, sequence: int, data: bytearray) -> Part:
        part = Part(part_name(0, sequence), len(data))
        self.io.upload(self.folder(key) + part.name, data)
        return part

    def compose_part(self, key: str, level: int, sequence: int, sources: Sequence[Part]) -> Part:
        folder = self.folder(key)
        part = Part(part_name(level, sequence), sum(source.size for source in sources))
        self.io.compose(folder + part.name, [folder + source.name for source in sources])
        return part

    def assemble(
        self, key: str, parts: Sequence[Part], target: str, metadata: Mapping[str, str] | None
    ) -> list[str]:
        """Compose the parts into ``target`` in one atomic write; returns the intermediates.

        Past 32 parts, groups of 32 are composed into intermediates in the folder first,
        so the target itself is written once, whole, with its metadata.
        """
        if not parts:
            self.io.upload(target, b"", metadata)
            return []
        folder = self.folder(key)
        sources = [folder + part.name for part in parts]
        intermediates: list[str] = []
        level, step = 0, MAX_COMPOSE_SOURCES
        while len(sources) > step:
            groups = [sources[i : i + step] for i in range(0, len(sources), step)]
            sources = []
            for sequence, group in enumerate(groups):
                if len(group) == 1:
                    sources.append(group[0])
                    continue
                name = f"{folder}c{level}-{sequence:06d}-{secrets.token_hex(4)}"
                self.io.compose(name, group)
                intermediates.append(name)
                sources.append(name)
            level += 1
        self.io.compose(target, sources, metadata)
        return intermediates

    def delete_quietly(self, names: Iterable[str]) -> None:
        """Garbage: a failure only leaves bytes that abort or the expiry sweep remove."""
        self.io.delete_many(names, on_error=lambda name: log.warning("could not delete %s; left", name))

    def remove(self, key: str) -> None:
        """Marker first, so the upload is gone for every writer before its parts go."""
        folder = self.folder(key)
        self.io.delete(folder + MARKER)
        failed: list[str] = []
        self.io.delete_many((stat.name for stat in self.io.iterate(folder)), on_error=failed.append)
        if failed:
            raise BackendError(f"could not delete {len(failed)} objects of the staged upload of {key}")

    def list(self) -> Iterator[ObjectInfo]:
        """Every upload folder, with or without its marker (crash leftovers must be found too).

        ``size`` is the bytes its objects hold, ``modified`` the newest of their times.
        """
        found: dict[str, tuple[int, float]] = {}
        for stat in self.io.iterate(self.root):
            folder = stat.name[len(self.root) :].partition("/")[0]
            size, modified = found.get(folder, (0, 0.0))
            found[folder] = (size + stat.size, max(modified, stat.modified))
        for folder, (size, modified) in found.items():
            yield ObjectInfo(folder.replace("+", "/"), size, modified)


class PartSpool:
    """A byte stream cut into parts of at most ``piece`` bytes; only the open piece is in memory."""

    def __init__(self, area: StagingArea, key: str, parts: Sequence[Part] = ()) -> None:
        self._area = area
        self._key = key
        self.parts = list(parts)
        self._parts_size = sum(part.size for part in parts)
        self._buffer = bytearray()
        self._sequence = len(parts)
        self.created: list[str] = []  # objects this spool wrote (parts and compositions)

    @property
    def size(self) -> int:
        return self._parts_size + len(self._buffer)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = max(self._area.piece - len(self._buffer), 0)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) >= self._area.piece:
                self.seal()

    def seal(self) -> None:
        """Upload the open piece (if any) as the next part."""
        if not self._buffer:
            return
        part = self._area.upload_part(self._key, self._next_sequence(), self._buffer)
        self._buffer = bytearray()
        self.parts.append(part)
        self.created.append(part.name)
        self._parts_size += part.size
        self._compact()

    def _compact(self) -> None:
        """32 trailing parts of one level become one part of the next (carry, as in counting)."""
        level = 0
        while len(self.parts) >= COMPACT_AT and all(p.level == level for p in self.parts[-COMPACT_AT:]):
            sources = self.parts[-COMPACT_AT:]
            part = self._area.compose_part(self._key, level + 1, self._next_sequence(), sources)
            self.parts[-COMPACT_AT:] = [part]
            self.created.append(part.name)
            level += 1

    def _next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence - 1


class GCSStagedWriter:
    """An open staged upload: a part spool, positioned at the end of the token it was opened with."""

    def __init__(self, area: StagingArea, key: str, parts: Sequence[Part], target: str) -> None:
        self._area = area
        self._key = key
        self._target = target
        self._spool = PartSpool(area, key, parts)
        self._flushed = tuple(parts)
        self._done = False

    @property
    def size(self) -> int:
        return self._spool.size

    def write(self, data: bytes) -> None:
        self._check_open()
        self._spool.write(data)

    def flush(self) -> str:
        self._check_open()
        self._spool.seal()
        self._flushed = tuple(self._spool.parts)
        self._spool.created.clear()  # a token names them now: never ours to delete again
        return encode_token(self._flushed)

    def commit(self, metadata: Mapping[str, str]) -> None:
        self._check_open()
        self._area.assemble(self._key, self._flushed, self._target, metadata)
        self._done = True
        try:
            self._area.remove(self._key)
        except BackendError as exc:  # the object is whole; leftovers are the expiry sweep's
            log.warning("committed %s but could not remove its staged parts: %s", self._key, exc)

    def close(self) -> None:
        """Objects written since the last flush are named by no token: remove them now."""
        if not self._done:
            self._done = True
            self._area.delete_quietly(self._area.folder(self._key) + name for name in self._spool.created)

    def _check_open(self) -> None:
        if self._done:
            raise BackendError(f"the staged upload of {self._key} is no longer open")
