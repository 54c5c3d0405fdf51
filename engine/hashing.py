"""Running hashes of upload sessions, portable across processes and nodes.

The digest of an upload is computed as its bytes arrive, and the hash state is
serialised (``rehashes``: SHA-256/SHA-512 with an exportable state, as fast as
hashlib) into the upload's row each time a chunk is acknowledged. A request for the
same upload that lands in another worker process, or on another node, resumes from
that state without reading a single staged byte back. That is what lets backends
stage uploads in place (an S3 multipart upload cannot be read before it completes).

Beside the digest, a fast xxh3 checksum of the bytes is kept for cheap scrubs. Its
state cannot be exported, so it is kept only while every chunk of an upload passes
through one process; otherwise the blob is stored without one and the scrubber
computes it on its first pass. It is never an identity.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import rehashes
import xxhash

from cargohold.engine.digests import check_algorithm

_IMPLEMENTATIONS: dict[str, Any] = {"sha256": rehashes.PySha256, "sha512": rehashes.PySha512}


class ContentHasher:
    """The content digest (exportable state) and, while it can be kept, an xxh3 checksum."""

    __slots__ = ("_checksum", "_digest", "algorithm")

    def __init__(self, algorithm: str, digest_state: bytes | None = None, checksum: Any = None) -> None:
        self.algorithm = check_algorithm(algorithm)
        cls = _IMPLEMENTATIONS[algorithm]
        self._digest = cls.deserialize(digest_state) if digest_state is not None else cls()
        self._checksum = checksum

    @classmethod
    def fresh(cls, algorithm: str) -> ContentHasher:
        return cls(algorithm, None, xxhash.xxh3_128())

    def update(self, data: bytes) -> None:
        self._digest.update(data)
        if self._checksum is not None:
            self._checksum.update(data)

    def state(self) -> bytes:
        """The digest's state, to store with the acknowledged size."""
        return bytes(self._digest.serialize())

    def copy(self) -> ContentHasher:
        checksum = self._checksum.copy() if self._checksum is not None else None
        return ContentHasher(self.algorithm, self.state(), checksum)

    def finish(self) -> tuple[str, str | None]:
        """The digest (``algorithm:hex``) and the checksum, if it was kept all along."""
        checksum = f"xxh3-128:{self._checksum.hexdigest()}" if self._checksum is not None else None
        return f"{self.algorithm}:{self._digest.finalize()}", checksum


def hash_stream(algorithm: str, chunks: Any) -> str:
    hasher = ContentHasher(algorithm)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.finish()[0]


class HashStates:
    """This process's live hashers, so an upload that stays here keeps its xxh3 checksum."""

    def __init__(self, capacity: int = 4096) -> None:
        self._states: OrderedDict[str, tuple[int, ContentHasher]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def resume(self, upload_id: str, algorithm: str, size: int, stored_state: bytes | None) -> ContentHasher:
        """A private hasher that has consumed exactly the first ``size`` bytes of the upload."""
        with self._lock:
            entry = self._states.get(upload_id)
        if entry is not None and entry[0] == size and entry[1].algorithm == algorithm:
            return entry[1].copy()
        if size == 0:
            return ContentHasher.fresh(algorithm)
        if stored_state is None:
            raise ValueError(f"upload {upload_id} has {size} bytes but no stored hash state")
        return ContentHasher(algorithm, stored_state)

    def save(self, upload_id: str, size: int, hasher: ContentHasher) -> None:
        with self._lock:
            self._states[upload_id] = (size, hasher)
            self._states.move_to_end(upload_id)
            while len(self._states) > self._capacity:
                self._states.popitem(last=False)

    def drop(self, upload_id: str) -> None:
        with self._lock:
            self._states.pop(upload_id, None)
