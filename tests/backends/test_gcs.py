"""What only the GCS backend promises beyond the conformance suite, on a real fake-gcs-server:
metadata on every committed object, part levels that keep tokens small, commits of more than
32 parts, uploads continued by another instance, overlapping writers, flat memory, retries,
signed URLs."""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cargohold.backends import BackendError, ObjectNotFound
from tests.backends.conftest import NAMES
from tests.backends.staging import stage_200_mib
from tests.backends.stores.gcs import FakeGCSServer, make_backend
from tests.support.servers import free_port

if "gcs" not in NAMES:
    pytest.skip("GCS is not among CARGOHOLD_TEST_BACKENDS", allow_module_level=True)

from cargohold.backends.gcs import GCSBackend
from cargohold.backends.gcs_client import Calls
from cargohold.backends.gcs_staged import (
    COMPACT_AT,
    MAX_COMPOSE_SOURCES,
    GCSStagedWriter,
    decode_token,
    encode_token,
)

MiB = 1024 * 1024
KiB = 1024
Factory = Callable[..., GCSBackend]


@pytest.fixture
def bucket(gcs_server: FakeGCSServer) -> Iterator[str]:
    name = gcs_server.new_bucket()
    yield name
    gcs_server.remove_bucket(name)


@pytest.fixture
def make(gcs_server: FakeGCSServer, bucket: str) -> Iterator[Factory]:
    """Backends on the test's bucket, with any settings; all closed at the end."""
    made: list[GCSBackend] = []

    def factory(**settings: Any) -> GCSBackend:
        made.append(make_backend(gcs_server, bucket, **settings))
        return made[-1]

    yield factory
    for store in made:
        store.close()


def object_names(server: FakeGCSServer, bucket: str, prefix: str = "") -> list[str]:
    with server.admin() as client:
        return sorted(blob.name for blob in client.list_blobs(bucket, prefix=prefix))


def metadata_of(server: FakeGCSServer, bucket: str, name: str) -> dict[str, str]:
    with server.admin() as client:
        return dict(client.bucket(bucket).get_blob(name).metadata or {})


def read_all(store: GCSBackend, key: str) -> bytes:
    return b"".join(store.read(key))


def stage(store: GCSBackend, key: str, pieces: list[bytes], token: str | None = None) -> str:
    """One PATCH per piece, each in its own ``open_staged``; returns the last token."""
    token = store.create_staged(key) if token is None else token
    for piece in pieces:
        with store.open_staged(key, token) as writer:
            writer.write(piece)
            token = writer.flush()
    return token


def commit(store: GCSBackend, key: str, token: str, metadata: dict[str, str] | None = None) -> None:
    with store.open_staged(key, token) as writer:
        writer.commit(metadata or {})


# -- objects -------------------------------------------------------------------------------------
def test_committed_objects_carry_their_metadata(
    make: Factory, gcs_server: FakeGCSServer, bucket: str
) -> None:
    store = make(chunk_size=256 * KiB)
    digest = {"digest": "sha256:" + "ab" * 32}
    store.put("blobs/m/small", [b"x" * 100], digest)
    store.put("blobs/m/large", [os.urandom(700 * KiB)], digest)  # three parts, composed
    commit(store, "blobs/m/staged", stage(store, "blobs/m/staged", [os.urandom(300 * KiB)]), digest)
    commit(store, "blobs/m/empty", store.create_staged("blobs/m/empty"), digest)
    for key in ("small", "large", "staged", "empty"):
        assert metadata_of(gcs_server, bucket, f"blobs/m/{key}") == digest, key
    assert object_names(gcs_server, bucket, ".staging/") == []  # no scratch parts left


def test_keys_live_under_the_prefix_and_come_back_relative(
    make: Factory, gcs_server: FakeGCSServer, bucket: str
) -> None:
    store = make(prefix="/registry/one/")
    store.put("blobs/p/key", [b"data"])
    commit(store, "blobs/p/staged", stage(store, "blobs/p/staged", [b"staged"]))
    assert object_names(gcs_server, bucket) == ["registry/one/blobs/p/key", "registry/one/blobs/p/staged"]
    assert sorted(info.key for info in store.list("blobs/")) == ["blobs/p/key", "blobs/p/staged"]


def test_listing_pages_and_never_shows_staged_parts(make: Factory) -> None:
    store = make(page_size=3)
    keys = [f"blobs/l/{i:02d}" for i in range(10)]
    for key in keys:
        store.put(key, [key.encode()])
    stage(store, "blobs/l/staged", [b"partial"])
    assert sorted(info.key for info in store.list("")) == keys
    assert [info.key for info in store.list_staged()] == ["blobs/l/staged"]


def test_a_read_is_pinned_to_the_generation_it_opened(make: Factory) -> None:
    store = make()
    store.put("blobs/g/key", [os.urandom(3 * MiB)])
    pieces = store.read("blobs/g/key")
    first = next(pieces)
    store.put("blobs/g/key", [os.urandom(3 * MiB)])  # overwritten mid-stream
    with pytest.raises(ObjectNotFound):
        b"".join(pieces)  # an error, never a mix of two versions
    assert len(first) == MiB


# -- staged uploads ----------------------------------------------------------------------------------
def test_parts_are_composed_into_levels_so_tokens_stay_small(
    make: Factory, gcs_server: FakeGCSServer, bucket: str
) -> None:
    store = make(chunk_size=256 * KiB)
    pieces = [os.urandom(256 * KiB) for _ in range(COMPACT_AT + 8)] + [os.urandom(1000)]
    token = stage(store, "blobs/c/levels", [b"".join(pieces[:20]), b"".join(pieces[20:])])
    parts = decode_token(token)
    assert [part.level for part in parts] == [1] + [0] * 9
    assert sum(part.size for part in parts) == sum(map(len, pieces))
    commit(store, "blobs/c/levels", token, {"digest": "d"})
    assert read_all(store, "blobs/c/levels") == b"".join(pieces)
    assert object_names(gcs_server, bucket, ".staging/") == []


def test_a_commit_of_more_than_32_parts_composes_a_tree(
    make: Factory, gcs_server: FakeGCSServer, bucket: str
) -> None:
    """A token names up to 31 parts per level (say 31 of level 1 after 992 tiny PATCHes, and
    31 of level 0): more than one compose request takes. Staged here directly, 62 parts."""
    store = make(chunk_size=256 * KiB)
    key = "blobs/c/tree"
    area = store._area
    pieces = [bytes([i % 251]) * (i + 1) for i in range(2 * (MAX_COMPOSE_SOURCES - 1))]
    area.create(key)
    parts = [area.upload_part(key, i, bytearray(piece)) for i, piece in enumerate(pieces)]
    assert len(parts) > MAX_COMPOSE_SOURCES
    commit(store, key, encode_token(parts), {"digest": "tree"})
    assert read_all(store, key) == b"".join(pieces)
    assert metadata_of(gcs_server, bucket, key) == {"digest": "tree"}
    assert object_names(gcs_server, bucket, ".staging/") == []


def test_another_instance_continues_and_commits_the_upload(make: Factory) -> None:
    first, second = make(chunk_size=256 * KiB), make(chunk_size=1 * MiB)
    data = [os.urandom(600 * KiB), os.urandom(900 * KiB + 3), os.urandom(5)]
    token = stage(first, "blobs/r/moved", data[:1])
    token = stage(second, "blobs/r/moved", data[1:2], token)  # another node, another piece size
    token = stage(first, "blobs/r/moved", data[2:], token)
    commit(second, "blobs/r/moved", token)
    assert read_all(first, "blobs/r/moved") == b"".join(data)


def test_overlapping_writers_cannot_mix_their_bytes(make: Factory) -> None:
    """Two writers opened from the same token (a client retrying while its first request
    still runs): each flush names only its own parts; whichever token the engine keeps
    commits exactly that writer's bytes."""
    store = make(chunk_size=256 * KiB)
    base = os.urandom(300 * KiB)
    token = stage(store, "blobs/o/both", [base])
    ours, theirs = os.urandom(500 * KiB), os.urandom(400 * KiB)
    with store.open_staged("blobs/o/both", token) as a, store.open_staged("blobs/o/both", token) as b:
        a.write(ours)
        b.write(theirs)
        token_a, token_b = a.flush(), b.flush()
    assert {p.name for p in decode_token(token_a)} & {p.name for p in decode_token(token_b)} == {
        p.name for p in decode_token(token)
    }
    commit(store, "blobs/o/both", token_b)
    assert read_all(store, "blobs/o/both") == base + theirs


def test_a_committed_or_aborted_upload_cannot_be_reopened(make: Factory) -> None:
    store = make()
    token = stage(store, "blobs/e/done", [b"bytes"])
    commit(store, "blobs/e/done", token)
    with pytest.raises(ObjectNotFound), store.open_staged("blobs/e/done", token):
        pass
    token = stage(store, "blobs/e/gone", [b"bytes"])
    store.abort_staged("blobs/e/gone")
    with pytest.raises(ObjectNotFound), store.open_staged("blobs/e/gone", token):
        pass
    store.create_staged("blobs/e/twice")
    with pytest.raises(BackendError, match="exists already"):
        store.create_staged("blobs/e/twice")


def test_a_foreign_token_is_refused(make: Factory) -> None:
    store = make()
    store.create_staged("blobs/t/key")
    for token in ("7", "{}", '{"v":1,"parts":[["../../other-object",5]]}'):
        with pytest.raises(BackendError), store.open_staged("blobs/t/key", token):
            pass


def test_crash_leftovers_are_listed_and_aborted(
    make: Factory, gcs_server: FakeGCSServer, bucket: str
) -> None:
    """A writer killed after uploading a part but before flushing never closes: its part is
    named by no token, yet list_staged finds the folder (even without its marker) and abort
    removes everything."""
    store = make(chunk_size=256 * KiB)
    store.create_staged("blobs/x/crashed")
    writer = GCSStagedWriter(store._area, "blobs/x/crashed", (), "blobs/x/crashed")  # never closed
    writer.write(os.urandom(300 * KiB))  # one part uploaded, the rest buffered; then "kill -9"
    with gcs_server.admin() as client:
        client.bucket(bucket).blob(".staging/blobs+x+crashed/upload").delete()
    leftovers = {info.key: info for info in store.list_staged()}
    assert leftovers["blobs/x/crashed"].size == 256 * KiB
    assert abs(leftovers["blobs/x/crashed"].modified - time.time()) < 300
    store.abort_staged("blobs/x/crashed")
    assert object_names(gcs_server, bucket) == []


def test_a_200_mib_staged_upload_holds_one_piece_in_memory(make: Factory) -> None:
    piece = 8 * MiB
    store = make(chunk_size=piece)
    peak, _, block = stage_200_mib(store, "blobs/big/staged")
    hasher = hashlib.sha256()
    assert peak < piece + 4 * MiB, f"peak {peak / MiB:.1f} MiB for {piece / MiB:.0f} MiB pieces"
    for chunk in store.read("blobs/big/staged"):
        hasher.update(chunk)
    assert hasher.hexdigest() == hashlib.sha256(block * 200).hexdigest()


# -- failures and capabilities --------------------------------------------------------------------
def test_transient_errors_are_retried_and_others_are_not() -> None:
    from google.api_core import exceptions

    calls = Calls(timeout=30, max_attempts=4)
    answers: list[Exception | str] = [
        exceptions.ServiceUnavailable("busy"),
        exceptions.TooManyRequests("slow"),
    ]
    answers.append("done")

    def flaky() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert calls.run("flaky", flaky) == "done"
    attempts = []

    def forbidden() -> None:
        attempts.append(1)
        raise exceptions.Forbidden("no")

    with pytest.raises(BackendError, match="403"):
        calls.run("forbidden", forbidden)
    assert len(attempts) == 1
    with pytest.raises(ValueError):  # our own bugs are not store failures
        calls.run("bug", lambda: int("x"))


def test_the_runtime_settings_with_the_emulator_variable(
    gcs_server: FakeGCSServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exactly how ``cargohold serve`` builds it: the config section, no credentials, and
    ``STORAGE_EMULATOR_HOST`` (set for this test only), which makes them anonymous."""
    from cargohold.config import GCSStorage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
    store = GCSBackend(**GCSStorage(bucket=bucket, prefix="configured").model_dump())
    try:
        store.check()
        store.put("blobs/v/key", [b"through the variable"])
        assert read_all(store, "blobs/v/key") == b"through the variable"
    finally:
        store.close()
    assert object_names(gcs_server, bucket) == ["configured/blobs/v/key"]


def test_an_unreachable_emulator_fails_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's own retry keeps trying a closed port for 70 to 120 s; ours gives up in seconds."""
    from cargohold.config import GCSStorage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    store = GCSBackend(**GCSStorage(bucket="nowhere").model_dump())
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match="ConnectionError"):
            store.check()
        assert time.monotonic() - started < 6
    finally:
        store.close()


def test_presigned_urls_need_signing_credentials(make: Factory) -> None:
    with pytest.raises(BackendError, match="presigned URLs need credentials that can sign"):
        make().presigned_url("blobs/s/key", 600)


def test_presigned_url_from_a_service_account_key(
    make: Factory, gcs_server: FakeGCSServer, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    account = {
        "type": "service_account",
        "project_id": "cargohold-test",
        "private_key_id": "test",
        "private_key": pem.decode(),
        "client_email": "registry@cargohold-test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    (tmp_path / "sa.json").write_text(json.dumps(account))
    make().put("blobs/s/key", [b"signed bytes"])
    signer = make(anonymous=False, credentials_file=tmp_path / "sa.json")
    url = signer.presigned_url("blobs/s/key", 600)  # signed locally: no request is made
    assert url.startswith(f"{gcs_server.endpoint}/") and "X-Goog-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as answer:  # fake-gcs-server does not check it
        assert answer.read() == b"signed bytes"
