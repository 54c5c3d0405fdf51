"""Running hashes of upload sessions, held by the process that received the bytes.

A hash state cannot be moved between processes, so when a request for an upload lands
in a process that does not hold its state (several workers, a restart), the state is
rebuilt from the staged bytes: correct, only slower. Catching up from a state that
is behind is safe because acknowledged staged bytes never change.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import xxhash

from cargohold.engine.digests import new_hasher

ReadStaged = Callable[[int, int], Iterator[bytes]]


class ContentHasher:
    """The content digest and, alongside it, a fast xxh3 checksum for cheap scrubs."""

    __slots__ = ("_checksum", "_digest", "algorithm")

    def __init__(self, algorithm: str, _digest: Any = None, _checksum: Any = None) -> None:
        self.algorithm = algorithm
        self._digest = _digest if _digest is not None else new_hasher(algorithm)
        self._checksum = _checksum if _checksum is not None else xxhash.xxh3_128()

    def update(self, data: bytes) -> None:
        self._digest.update(data)
        self._checksum.update(data)

    def copy(self) -> ContentHasher:
        return ContentHasher(self.algorithm, self._digest.copy(), self._checksum.copy())

    @property
    def digest(self) -> str:
        return f"{self.algorithm}:{self._digest.hexdigest()}"

    @property
    def checksum(self) -> str:
        """Never an identity: only a cheap way to notice bit rot later."""
        return f"xxh3-128:{self._checksum.hexdigest()}"


def hash_stream(algorithm: str, chunks: Iterator[bytes]) -> ContentHasher:
    hasher = ContentHasher(algorithm)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher


class HashStates:
    def __init__(self, capacity: int = 4096) -> None:
        self._states: OrderedDict[str, tuple[str, int, ContentHasher]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def resume(self, upload_id: str, algorithm: str, size: int, read_staged: ReadStaged) -> ContentHasher:
        """A private hasher that has consumed exactly the first ``size`` staged bytes."""
        with self._lock:
            entry = self._states.get(upload_id)
        if entry is not None and entry[0] == algorithm and entry[1] <= size:
            hasher, offset = entry[2].copy(), entry[1]
        else:
            hasher, offset = ContentHasher(algorithm), 0
        if offset < size:
            for chunk in read_staged(offset, size):
                hasher.update(chunk)
        return hasher

    def save(self, upload_id: str, algorithm: str, size: int, hasher: ContentHasher) -> None:
        with self._lock:
            self._states[upload_id] = (algorithm, size, hasher)
            self._states.move_to_end(upload_id)
            while len(self._states) > self._capacity:
                self._states.popitem(last=False)

    def drop(self, upload_id: str) -> None:
        with self._lock:
            self._states.pop(upload_id, None)
