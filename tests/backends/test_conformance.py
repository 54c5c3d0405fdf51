"""What every backend promises (``cargohold.backends.base``), checked on a real store."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from cargohold.backends import Backend, BackendError, ObjectNotFound
from cargohold.backends.base import ListsNames

MiB = 1024 * 1024


def read_all(backend: Backend, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join(backend.read(key, start, end))


def pattern(size: int, seed: int = 0) -> Iterator[bytes]:
    """``size`` deterministic bytes in 1 MiB pieces, never held whole."""
    block = hashlib.sha512(str(seed).encode()).digest() * (MiB // 64)
    sent = 0
    while sent < size:
        piece = block[: min(MiB, size - sent)]
        sent += len(piece)
        yield piece


def sha256_of(chunks: Iterator[bytes]) -> str:
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


# -- whole objects ----------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 4096, 5 * MiB + 3])
def test_put_and_read_round_trip(backend: Backend, size: int) -> None:
    data = os.urandom(size)
    assert (
        backend.put("blobs/ab/round-trip", [data[: size // 2], data[size // 2 :]], {"digest": "sha256:x"})
        == size
    )
    assert read_all(backend, "blobs/ab/round-trip") == data
    info = backend.stat("blobs/ab/round-trip")
    assert (info.key, info.size) == ("blobs/ab/round-trip", size)
    assert abs(info.modified - time.time()) < 300


def test_hundred_mib_object_streams(backend: Backend) -> None:
    size = 100 * MiB
    assert backend.put("blobs/big/hundred", pattern(size)) == size
    assert backend.stat("blobs/big/hundred").size == size
    largest = 0
    hasher = hashlib.sha256()
    for chunk in backend.read("blobs/big/hundred"):
        largest = max(largest, len(chunk))
        hasher.update(chunk)
    assert hasher.hexdigest() == sha256_of(pattern(size))
    assert largest <= 16 * MiB  # streamed in pieces, not read whole


def test_ranged_reads_at_the_edges(backend: Backend) -> None:
    data = os.urandom(3 * MiB + 17)
    size = len(data)
    backend.put("blobs/r/ranges", [data])
    for start, end in [(0, 1), (0, size), (size - 1, size), (MiB - 1, MiB + 1), (5, None), (size - 1, None)]:
        assert read_all(backend, "blobs/r/ranges", start, end) == data[start:end], (start, end)


def test_missing_keys_are_object_not_found(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.stat("blobs/no/such-key")
    with pytest.raises(ObjectNotFound):
        backend.read("blobs/no/such-key")  # raised by the call, before any iteration


def test_overwrite_replaces_the_whole_object(backend: Backend) -> None:
    backend.put("blobs/o/key", [b"a much longer first version"])
    backend.put("blobs/o/key", [b"second"])
    assert read_all(backend, "blobs/o/key") == b"second"
    assert backend.stat("blobs/o/key").size == 6


@pytest.mark.parametrize(
    "key",
    [
        "../escape",
        "a/../../b",
        "/abs",
        "a//b",
        "a/./b",
        "",
        "a\\b",
        "a b",
        "x/",
        "..",
        ".",
        "a/..",
        "a/.",
        "a\n",
    ],
)
def test_invalid_keys_are_refused(backend: Backend, key: str) -> None:
    with pytest.raises(ValueError):
        backend.put(key, [b"x"])


def test_concurrent_writers_to_distinct_keys(backend: Backend) -> None:
    payloads = {f"blobs/c/{i:02d}": os.urandom(256 * 1024 + i) for i in range(12)}
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda item: backend.put(item[0], [item[1]]), payloads.items()))
    for key, data in payloads.items():
        assert read_all(backend, key) == data


# -- listing and deleting -----------------------------------------------------------------
def test_listing_pages_and_batch_delete(backend: Backend) -> None:
    keys = [f"blobs/many/{i:05d}" for i in range(1100)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: backend.put(key, [key.encode()]), keys))
    backend.put("blobs/other/outside", [b"not in the prefix"])
    listed = sorted(info.key for info in backend.list("blobs/many/"))
    assert listed == keys
    assert {info.size for info in backend.list("blobs/many/0000")} == {len(keys[0])}
    assert sorted(info.key for info in backend.list("blobs/")) == sorted([*keys, "blobs/other/outside"])
    failed = backend.delete_many([*keys, "blobs/many/never-existed"])
    assert failed == []
    assert list(backend.list("blobs/many/")) == []
    assert read_all(backend, "blobs/other/outside") == b"not in the prefix"


def test_listing_is_in_key_order(backend: Backend) -> None:
    """The GC's leak scan walks the listing beside the keys the rows name, both ascending:
    a store that lists out of order would make every later key a suspect to re-check.
    Keys shaped as the engine lays them out (``blobs/<xx>/<copy id>``)."""
    keys = sorted(
        f"blobs/{copy[:2]}/{copy}" for copy in (f"{n:02x}{n * 7919:030x}" for n in range(0, 256, 17))
    )
    keys = sorted([*keys, "blobs/ff/ff"])
    for key in reversed(keys):
        backend.put(key, [b"x"])
    assert [info.key for info in backend.list("blobs/")] == keys
    if isinstance(backend, ListsNames):
        assert list(backend.list_names("blobs/")) == keys
        assert list(backend.list_names("blobs/ff/")) == [key for key in keys if key.startswith("blobs/ff/")]


def test_delete_is_idempotent(backend: Backend) -> None:
    backend.put("blobs/d/key", [b"x"])
    backend.delete("blobs/d/key")
    backend.delete("blobs/d/key")
    with pytest.raises(ObjectNotFound):
        backend.stat("blobs/d/key")


# -- staged uploads ---------------------------------------------------------------------------
def test_staged_upload_in_many_parts_across_reopens(backend: Backend) -> None:
    """Each ``with open_staged`` is one PATCH, perhaps in another process; sizes cross any
    part-size boundary; the token returned by ``flush`` is what the engine stores."""
    sizes = [3 * MiB, 7 * MiB + 5, 1, 12 * MiB, 0, 2 * MiB + 1]
    parts = [os.urandom(size) for size in sizes]
    key = "blobs/st/many"
    token = backend.create_staged(key)
    expected = 0
    for part in parts:
        with backend.open_staged(key, token) as writer:
            assert writer.size == expected
            writer.write(part[: len(part) // 3])
            writer.write(part[len(part) // 3 :])
            token = writer.flush()
            expected += len(part)
            assert writer.size == expected
        assert isinstance(token, str) and len(token) < 64 * 1024
    assert key in {info.key for info in backend.list_staged()}
    with pytest.raises(ObjectNotFound):
        backend.stat(key)  # invisible until committed
    data = b"".join(parts)
    with backend.open_staged(key, token) as writer:
        writer.commit({"digest": "sha256:" + hashlib.sha256(data).hexdigest()})
    assert read_all(backend, key) == data
    assert key not in {info.key for info in backend.list_staged()}


def test_bytes_after_the_acknowledged_token_are_not_part_of_the_upload(backend: Backend) -> None:
    """A request that wrote and flushed but was never acknowledged (it died, or the engine's
    commit failed) left bytes behind: reopening with the older token ignores them."""
    acknowledged, lost, after = os.urandom(6 * MiB + 7), os.urandom(5 * MiB + 1), os.urandom(MiB)
    key = "blobs/st/trunc"
    token = backend.create_staged(key)
    with backend.open_staged(key, token) as writer:
        writer.write(acknowledged)
        token = writer.flush()
    with backend.open_staged(key, token) as writer:  # never acknowledged
        writer.write(lost)
        writer.flush()
    with backend.open_staged(key, token) as writer:
        assert writer.size == len(acknowledged)
        writer.write(after)
        final = writer.flush()
    with backend.open_staged(key, final) as writer:
        writer.commit({})
    assert read_all(backend, key) == acknowledged + after


def test_unflushed_bytes_are_not_committed(backend: Backend) -> None:
    key = "blobs/st/unflushed"
    token = backend.create_staged(key)
    with backend.open_staged(key, token) as writer:
        writer.write(b"kept")
        token = writer.flush()
        writer.write(b" and a crashed tail")  # never flushed
    with backend.open_staged(key, token) as writer:
        writer.commit({})
    assert read_all(backend, key) == b"kept"


def test_empty_staged_upload_commits_an_empty_object(backend: Backend) -> None:
    key = "blobs/st/empty"
    token = backend.create_staged(key)
    with backend.open_staged(key, token) as writer:
        writer.flush()
        writer.commit({})
    assert read_all(backend, key) == b""


def test_aborted_staged_upload_is_gone(backend: Backend) -> None:
    key = "blobs/st/abort"
    token = backend.create_staged(key)
    with backend.open_staged(key, token) as writer:
        writer.write(os.urandom(6 * MiB))
        token = writer.flush()
    backend.abort_staged(key)
    backend.abort_staged(key)  # idempotent
    assert key not in {info.key for info in backend.list_staged()}
    assert list(backend.list("blobs/")) == []
    backend.abort_staged("blobs/st/never-started")


def test_a_staged_upload_is_invisible_until_committed(backend: Backend) -> None:
    key = "blobs/st/hidden"
    token = backend.create_staged(key)
    with backend.open_staged(key, token) as writer:
        writer.write(b"partial")
        writer.flush()
    assert list(backend.list("")) == []


# -- failures -------------------------------------------------------------------------------------
def test_an_unreachable_store_fails_fast_with_backend_error(unreachable_backend: Backend) -> None:
    started = time.monotonic()
    with pytest.raises(BackendError):
        unreachable_backend.check()
    with pytest.raises(BackendError):
        unreachable_backend.put("blobs/x/y", [b"data"])
    with pytest.raises(BackendError):
        unreachable_backend.read("blobs/x/y")
    with pytest.raises(BackendError):
        unreachable_backend.create_staged("blobs/x/staged")
    assert time.monotonic() - started < 60, "an unreachable store must not hang a request"
