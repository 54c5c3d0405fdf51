"""What the shared suite cannot see of the S3 backend: what reaches the bucket, and how it
behaves across processes, under overlap and for large uploads (SeaweedFS on loopback)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from cargohold.backends import StagedBusy
from cargohold.backends.s3 import S3Backend
from tests.backends.conftest import NAMES
from tests.backends.staging import stage_200_mib
from tests.backends.stores.s3 import SeaweedServer, fresh_bucket

pytestmark = pytest.mark.skipif("s3" not in NAMES, reason="CARGOHOLD_TEST_BACKENDS leaves out s3")

MiB = 1024 * 1024
Factory = Callable[..., S3Backend]


@pytest.fixture
def bucket(request: pytest.FixtureRequest) -> tuple[SeaweedServer, str]:
    return fresh_bucket(request)


@pytest.fixture
def make(bucket: tuple[SeaweedServer, str]) -> Factory:
    """``S3Backend`` instances on one fresh bucket: several of them stand for several processes."""
    server, name = bucket
    return lambda **overrides: S3Backend(**server.settings(name, **overrides))


@pytest.fixture
def raw(bucket: tuple[SeaweedServer, str]) -> Any:
    return bucket[0].client


def keys_in(raw: Any, bucket: str) -> list[str]:
    return sorted(item["Key"] for item in raw.list_objects_v2(Bucket=bucket).get("Contents", []))


def tags(raw: Any, bucket: str, key: str) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in raw.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}


def staged_upload(store: S3Backend, key: str, data: bytes, digest: str = "sha256:x") -> None:
    token = store.create_staged(key)
    with store.open_staged(key, token) as writer:
        writer.write(data)
        writer.flush()
        writer.commit({"digest": digest})


def test_storage_class_and_encryption_reach_every_object(make: Factory, raw: Any, bucket: Any) -> None:
    store = make(storage_class="STANDARD_IA", server_side_encryption="AES256")
    store.put("blobs/sc/put", [os.urandom(6 * MiB)])  # multipart
    store.put("blobs/sc/small", [b"small"])
    staged_upload(store, "blobs/sc/staged", os.urandom(7 * MiB))
    for key in ("blobs/sc/put", "blobs/sc/small", "blobs/sc/staged"):
        head = raw.head_object(Bucket=bucket[1], Key=f"registry/{key}")
        assert (head["StorageClass"], head["ServerSideEncryption"]) == ("STANDARD_IA", "AES256"), key

    token = store.create_staged("blobs/sc/tail")
    with store.open_staged("blobs/sc/tail", token) as writer:
        writer.write(b"a short tail")
        writer.flush()
    (tail,) = [key for key in keys_in(raw, bucket[1]) if key.startswith("registry/.staging/")]
    assert tail.startswith("registry/.staging/blobs/sc/tail/tail-")
    head = raw.head_object(Bucket=bucket[1], Key=tail)
    assert head["ServerSideEncryption"] == "AES256"
    assert head.get("StorageClass", "STANDARD") == "STANDARD"  # short-lived: no minimum-duration class


def test_digest_travels_with_every_object_as_a_tag(make: Factory, raw: Any, bucket: Any) -> None:
    store = make()
    data = os.urandom(12 * MiB + 1)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    staged_upload(store, "blobs/md/staged", data, digest)
    store.put("blobs/md/put", [data], {"digest": digest})
    store.put("blobs/md/small", [b"x"], {"digest": "sha512:" + hashlib.sha512(b"x").hexdigest()})
    assert tags(raw, bucket[1], "registry/blobs/md/staged") == {"digest": digest}
    assert tags(raw, bucket[1], "registry/blobs/md/put") == {"digest": digest}
    assert tags(raw, bucket[1], "registry/blobs/md/small")["digest"].startswith("sha512:")


def test_presigned_url_works_with_plain_http_and_a_tampered_one_is_refused(make: Factory) -> None:
    store = make()
    data = os.urandom(100_000)
    store.put("blobs/pre/sign", [data])
    url = store.presigned_url("blobs/pre/sign", 300)
    assert httpx.get(url).content == data
    signature = url.rsplit("X-Amz-Signature=", 1)[1][:64]
    tampered = url.replace(signature, signature[::-1])
    assert httpx.get(tampered).status_code == 403


def test_a_second_process_continues_and_commits_a_staged_upload(make: Factory) -> None:
    first, second = make(), make()
    head, middle, rest = os.urandom(7 * MiB + 3), os.urandom(MiB), os.urandom(4 * MiB)
    token = first.create_staged("blobs/two/procs")
    with first.open_staged("blobs/two/procs", token) as writer:
        writer.write(head)
        token = writer.flush()
    with second.open_staged("blobs/two/procs", token) as writer:
        assert writer.size == len(head)
        writer.write(middle)
        token = writer.flush()
    with first.open_staged("blobs/two/procs", token) as writer:
        writer.write(rest)
        writer.flush()
        writer.commit({})
    assert b"".join(second.read("blobs/two/procs")) == head + middle + rest
    assert list(first.list_staged()) == []


def test_overlapping_writers_cannot_both_win(make: Factory) -> None:
    """Two processes continue the same token: at most one commit succeeds, and a refused
    commit leaves nothing visible (S3 would otherwise assemble bytes the engine never hashed)."""
    one, other = make(), make()
    token = one.create_staged("blobs/race/key")
    with one.open_staged("blobs/race/key", token) as a, other.open_staged("blobs/race/key", token) as b:
        a.write(os.urandom(6 * MiB))
        b.write(os.urandom(6 * MiB))
        a_token, b_token = a.flush(), b.flush()
    committed = []
    for store, flushed in ((one, a_token), (other, b_token)):
        try:
            with store.open_staged("blobs/race/key", flushed) as writer:
                writer.commit({})
            committed.append(flushed)
        except StagedBusy:
            pass
    assert len(committed) <= 1
    if not committed:
        assert list(one.list("blobs/race/")) == []


def test_a_second_writer_in_the_same_process_is_refused_at_once(make: Factory) -> None:
    store = make()
    token = store.create_staged("blobs/busy/key")
    with store.open_staged("blobs/busy/key", token), pytest.raises(StagedBusy):
        store.open_staged("blobs/busy/key", token).__enter__()
    with store.open_staged("blobs/busy/key", token) as writer:  # free again
        assert writer.size == 0


def test_staged_upload_of_200_mib_keeps_memory_flat_and_the_token_small(make: Factory) -> None:
    store = make(part_size=8 * MiB)
    peak, tokens, block = stage_200_mib(store, "blobs/big/staged")
    assert all(len(token) < 512 for token in tokens)
    assert peak < 24 * MiB, f"peak {peak / MiB:.1f} MiB for a 200 MiB upload"
    hasher = hashlib.sha256()
    for chunk in store.read("blobs/big/staged"):
        hasher.update(chunk)
    assert hasher.hexdigest() == hashlib.sha256(block * 200).hexdigest()


def test_abort_removes_a_crashed_writers_parts_and_tails(make: Factory, raw: Any, bucket: Any) -> None:
    store = make()
    token = store.create_staged("blobs/crash/key")
    with store.open_staged("blobs/crash/key", token) as writer:
        writer.write(os.urandom(11 * MiB))  # two parts uploaded, then the process "dies"
    with store.open_staged("blobs/crash/key", token) as writer:
        writer.write(os.urandom(MiB))
        writer.flush()  # a tail object, never acknowledged
    assert [info.key for info in store.list_staged()] == ["blobs/crash/key"]
    store.abort_staged("blobs/crash/key")
    assert keys_in(raw, bucket[1]) == []
    assert raw.list_multipart_uploads(Bucket=bucket[1]).get("Uploads", []) == []
    assert list(store.list_staged()) == []


@pytest.mark.parametrize(("prefix", "root"), [("", ""), ("reg", "reg/"), ("reg/", "reg/"), ("/a/b/", "a/b/")])
def test_prefix_is_normalised(make: Factory, raw: Any, bucket: Any, prefix: str, root: str) -> None:
    store = make(prefix=prefix)
    store.put("blobs/p/key", [b"x"])
    assert keys_in(raw, bucket[1]) == [f"{root}blobs/p/key"]
    assert [info.key for info in store.list("")] == ["blobs/p/key"]


def test_listing_offers_only_keys_the_backend_could_have_written(
    make: Factory, raw: Any, bucket: Any
) -> None:
    store = make()
    store.put("blobs/l/mine", [b"x"])
    for foreign in ("registry/blobs/l/with space", "registry/blobs/l/dir/", "elsewhere/blobs/l/x"):
        raw.put_object(Bucket=bucket[1], Key=foreign, Body=b"")
    assert [info.key for info in store.list("blobs/")] == ["blobs/l/mine"]


def test_small_patches_leave_at_most_two_tails_and_commit_none(make: Factory, raw: Any, bucket: Any) -> None:
    """A tail is the short remainder of a PATCH; the next PATCH takes it back into a part."""
    store = make()
    pieces = [os.urandom(MiB + i) for i in range(7)]
    token = store.create_staged("blobs/tails/key")
    for piece in pieces:
        with store.open_staged("blobs/tails/key", token) as writer:
            writer.write(piece)
            token = writer.flush()
        tails = [key for key in keys_in(raw, bucket[1]) if "/.staging/" in f"/{key}"]
        assert 1 <= len(tails) <= 2, tails
    with store.open_staged("blobs/tails/key", token) as writer:
        writer.commit({})
    assert b"".join(store.read("blobs/tails/key")) == b"".join(pieces)
    assert keys_in(raw, bucket[1]) == ["registry/blobs/tails/key"]


def test_aborting_a_key_leaves_the_staged_uploads_below_it_alone(make: Factory) -> None:
    store = make()
    tokens = {}
    for key in ("blobs/n/a", "blobs/n/a/b"):
        with store.open_staged(key, store.create_staged(key)) as writer:
            writer.write(key.encode())
            tokens[key] = writer.flush()
    store.abort_staged("blobs/n/a")
    assert [info.key for info in store.list_staged()] == ["blobs/n/a/b"]
    with store.open_staged("blobs/n/a/b", tokens["blobs/n/a/b"]) as writer:
        writer.commit({})
    assert b"".join(store.read("blobs/n/a/b")) == b"blobs/n/a/b"
