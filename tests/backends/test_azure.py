"""What the shared suite cannot see of the Azure backend: what reaches the container, and how
it behaves across processes, under overlap, after crashes and for large uploads (Azurite)."""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import socket
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.storage.blob import ContainerClient

from cargohold.backends import BackendError, ObjectNotFound, PresignedURLs, StagedBusy
from cargohold.backends.azure import AzureBackend
from tests.backends.conftest import NAMES
from tests.backends.staging import stage_200_mib
from tests.backends.stores.azure import ACCOUNT_KEY, AzuriteServer, backend_settings, connection_string
from tests.support.servers import free_port

pytestmark = pytest.mark.skipif("azure" not in NAMES, reason="CARGOHOLD_TEST_BACKENDS leaves out azure")

MiB = 1024 * 1024
Factory = Callable[..., AzureBackend]


@pytest.fixture
def container(request: pytest.FixtureRequest, azure_server: AzuriteServer) -> str:
    name = azure_server.new_container()
    request.addfinalizer(lambda: azure_server.drop_container(name))
    return name


@pytest.fixture
def make(azure_server: AzuriteServer, container: str) -> Factory:
    """``AzureBackend`` instances on one fresh container: several of them stand for several processes."""
    return lambda **overrides: AzureBackend(**azure_server.settings(container, **overrides))


@pytest.fixture
def raw(azure_server: AzuriteServer, container: str) -> ContainerClient:
    """The container seen with the plain SDK, behind the backend's back."""
    return azure_server.service().get_container_client(container)


def names_in(raw: ContainerClient) -> list[str]:
    return sorted(blob.name for blob in raw.list_blobs())


def staged_upload(store: AzureBackend, key: str, data: bytes, digest: str = "sha256:x") -> None:
    token = store.create_staged(key)
    with store.open_staged(key, token) as writer:
        writer.write(data)
        writer.flush()
        writer.commit({"digest": digest})


# -- what reaches the container -------------------------------------------------------------------
def test_committed_objects_carry_their_metadata(make: Factory, raw: ContainerClient) -> None:
    store = make()
    store.put("blobs/m/small", [b"tiny"], {"digest": "sha256:small"})
    store.put("blobs/m/large", [os.urandom(9 * MiB)], {"digest": "sha256:large"})  # three blocks
    staged_upload(store, "blobs/m/staged", os.urandom(5 * MiB), "sha256:staged")
    for name, digest in [("small", "sha256:small"), ("large", "sha256:large"), ("staged", "sha256:staged")]:
        props = raw.get_blob_client(f"registry/blobs/m/{name}").get_blob_properties()
        assert props.metadata == {"digest": digest}
    assert names_in(raw) == ["registry/blobs/m/large", "registry/blobs/m/small", "registry/blobs/m/staged"]


def test_a_staged_upload_is_only_uncommitted_blocks_and_commit_copies_none(
    make: Factory, raw: ContainerClient
) -> None:
    """Nothing readable exists at the key until commit, and commit lists the very blocks
    that were staged there: no copy, no second upload of the bytes."""
    store = make()
    data = os.urandom(10 * MiB + 5)
    token = store.create_staged("blobs/zc/key")
    with store.open_staged("blobs/zc/key", token) as writer:
        writer.write(data)
        writer.flush()
        blob = raw.get_blob_client("registry/blobs/zc/key")
        with pytest.raises(ResourceNotFoundError):
            blob.get_blob_properties()
        _, staged = blob.get_block_list("uncommitted")
        assert [block.size for block in staged] == [4 * MiB, 4 * MiB, 2 * MiB + 5]
        assert names_in(raw) == ["registry/.staging/blobs+zc+key"]
        writer.commit({"digest": "sha256:zc"})
    committed, uncommitted = blob.get_block_list("all")
    assert [block.id for block in committed] == [block.id for block in staged]
    assert uncommitted == []
    assert blob.get_blob_properties().copy.id is None
    assert blob.download_blob().readall() == data
    assert names_in(raw) == ["registry/blobs/zc/key"]


@pytest.mark.parametrize(("prefix", "root"), [("", ""), ("reg", "reg/"), ("/a/b/", "a/b/")])
def test_keys_live_under_the_prefix_and_come_back_relative(
    make: Factory, raw: ContainerClient, prefix: str, root: str
) -> None:
    store = make(prefix=prefix)
    store.put("blobs/p/key", [b"x"])
    staged_upload(store, "blobs/p/staged", b"y")
    assert names_in(raw) == [f"{root}blobs/p/key", f"{root}blobs/p/staged"]
    assert sorted(info.key for info in store.list("")) == ["blobs/p/key", "blobs/p/staged"]


def test_prefixes_in_one_container_do_not_see_each_other(make: Factory) -> None:
    one, other = make(prefix="tenant-a"), make(prefix="tenant-b")
    one.put("blobs/t/key", [b"a"])
    assert list(other.list("")) == []
    with pytest.raises(ObjectNotFound):
        other.stat("blobs/t/key")


def test_listing_follows_pages(make: Factory) -> None:
    store = make()
    store.list_page_size = 100  # Azure's most is 5000; small pages make the paging visible
    keys = [f"blobs/pg/{i:03d}" for i in range(250)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: store.put(key, [b"x"]), keys))
    assert sorted(info.key for info in store.list("blobs/pg/")) == keys


def test_listing_offers_only_keys_the_backend_could_have_written(make: Factory, raw: ContainerClient) -> None:
    store = make()
    store.put("blobs/l/ok", [b"x"])
    raw.upload_blob("registry/blobs/l/not a key", b"foreign")
    raw.upload_blob("elsewhere/blobs/l/x", b"outside the prefix")
    assert [info.key for info in store.list("blobs/")] == ["blobs/l/ok"]


# -- SAS URLs --------------------------------------------------------------------------------------
def test_presigned_url_works_with_plain_http_and_a_tampered_one_is_refused(make: Factory) -> None:
    store = make()
    assert isinstance(store, PresignedURLs)
    data = os.urandom(100_000)
    store.put("blobs/pre/sign", [data])
    url = store.presigned_url("blobs/pre/sign", 300)
    assert httpx.get(url).content == data
    signature = url.rsplit("sig=", 1)[1].split("&")[0]
    forged = quote(base64.b64encode(bytes(32)).decode(), safe="")  # well-formed, but not the key's
    tampered = url.replace(f"sig={signature}", f"sig={forged}")
    assert httpx.get(tampered).status_code == 403
    assert httpx.put(url, content=b"overwrite", headers={"x-ms-blob-type": "BlockBlob"}).status_code == 403
    assert httpx.get(store.presigned_url("blobs/pre/missing", 300)).status_code == 404


def test_presigned_urls_need_the_account_key(azure_server: AzuriteServer, container: str) -> None:
    store = AzureBackend(container=container, account_url=azure_server.blob_url)  # anonymous
    with pytest.raises(BackendError, match="account key"):
        store.presigned_url("blobs/pre/sign", 300)


# -- across processes, overlap and crashes ------------------------------------------------------------
def test_a_second_instance_continues_and_commits_a_staged_upload(make: Factory) -> None:
    first, second = make(), make()
    head, middle, rest = os.urandom(7 * MiB + 3), os.urandom(MiB), os.urandom(4 * MiB)
    token = first.create_staged("blobs/two/procs")
    with first.open_staged("blobs/two/procs", token) as writer:
        writer.write(head)
        token = writer.flush()
    assert [info.key for info in second.list_staged()] == ["blobs/two/procs"]
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


def test_overlapping_writers_cannot_both_commit(make: Factory) -> None:
    """Two processes continue the same token: the first commit wins, the second is StagedBusy
    and the object keeps exactly the winner's bytes. Here the loser adds nothing, so its
    list names only blocks the winner committed: without the create-only Put Block List it
    would silently cut the object back to the older token."""
    one, other = make(), make()
    head, tail = os.urandom(5 * MiB), os.urandom(MiB)
    token = one.create_staged("blobs/race/key")
    with one.open_staged("blobs/race/key", token) as writer:
        writer.write(head)
        token = writer.flush()
    with one.open_staged("blobs/race/key", token) as a, other.open_staged("blobs/race/key", token) as b:
        a.write(tail)
        a.flush()
        a.commit({"digest": "sha256:winner"})
        with pytest.raises(StagedBusy):
            b.commit({"digest": "sha256:loser"})
    assert b"".join(other.read("blobs/race/key")) == head + tail


def test_overlapping_writers_never_mix_their_bytes(make: Factory) -> None:
    one, other = make(), make()
    token = one.create_staged("blobs/mix/key")
    mine, theirs = os.urandom(5 * MiB), os.urandom(6 * MiB)
    with one.open_staged("blobs/mix/key", token) as a, other.open_staged("blobs/mix/key", token) as b:
        a.write(mine)
        b.write(theirs)
        a.flush()
        b.flush()
        a.commit({})
        with pytest.raises(StagedBusy):
            b.commit({})
    assert b"".join(other.read("blobs/mix/key")) == mine


def test_a_second_writer_in_the_same_process_is_refused_at_once(make: Factory) -> None:
    store = make()
    token = store.create_staged("blobs/busy/key")
    with store.open_staged("blobs/busy/key", token), pytest.raises(StagedBusy):
        store.open_staged("blobs/busy/key", token).__enter__()
    with store.open_staged("blobs/busy/key", token) as writer:  # free again
        assert writer.size == 0


def test_a_committed_or_aborted_upload_cannot_be_reopened(make: Factory) -> None:
    store = make()
    for key in ("blobs/re/committed", "blobs/re/aborted"):
        token = store.create_staged(key)
        with store.open_staged(key, token) as writer:
            writer.write(b"data")
            token = writer.flush()
            if key.endswith("committed"):
                writer.commit({})
        if key.endswith("aborted"):
            store.abort_staged(key)
        with pytest.raises(ObjectNotFound), store.open_staged(key, token):
            pass


@pytest.mark.parametrize("data", [b"", b"the last chunk"])
def test_a_retried_finish_after_a_commit_whose_answer_was_lost_starts_over(
    make: Factory, monkeypatch: pytest.MonkeyPatch, data: bytes
) -> None:
    """The commit reached Azure but the process died before its marker went: reopening with
    the acknowledged token must say "gone" (the engine restarts the upload), not hand out a
    writer whose create-only commit would be refused on every retry."""
    store = make()
    monkeypatch.setattr(store, "forget_staged", lambda key: None)  # the crash
    token = store.create_staged("blobs/retry/key")
    with store.open_staged("blobs/retry/key", token) as writer:
        writer.write(data)
        writer.flush()
        writer.commit({})
    with pytest.raises(ObjectNotFound, match="already"), store.open_staged("blobs/retry/key", token):
        pass


def test_lost_blocks_are_noticed_when_the_upload_is_reopened(make: Factory, raw: ContainerClient) -> None:
    """Blocks that vanished (expired after a week, or discarded by a foreign commit) make the
    token unresolvable: the engine learns it at the next request, not at the last one."""
    store = make()
    token = store.create_staged("blobs/lost/key")
    with store.open_staged("blobs/lost/key", token) as writer:
        writer.write(os.urandom(MiB))
        token = writer.flush()
    blob = raw.get_blob_client("registry/blobs/lost/key")
    blob.commit_block_list([])  # discards every uncommitted block
    blob.delete_blob()
    with pytest.raises(ObjectNotFound, match="gone"), store.open_staged("blobs/lost/key", token):
        pass


@pytest.mark.parametrize(
    "token", ["", "garbage", "azb1:5:" + "0" * 16, "azb1:0:" + "1" * 16, "azb1:999:" + "1" * 16]
)
def test_a_foreign_token_is_refused(make: Factory, token: str) -> None:
    store = make()
    store.create_staged("blobs/tok/key")
    with pytest.raises(BackendError), store.open_staged("blobs/tok/key", token):
        pass


@pytest.mark.parametrize("delta", [-1, 1])
def test_a_token_whose_size_disagrees_with_its_blocks_is_refused(make: Factory, delta: int) -> None:
    store = make()
    token = store.create_staged("blobs/tok/size")
    with store.open_staged("blobs/tok/size", token) as writer:
        writer.write(b"ten bytes!")
        token = writer.flush()
    _, size, last = token.split(":")
    forged = f"azb1:{int(size) + delta}:{last}"
    with pytest.raises(BackendError, match="add up"), store.open_staged("blobs/tok/size", forged):
        pass


def test_abort_discards_staged_blocks_and_leaves_nothing(make: Factory, raw: ContainerClient) -> None:
    store = make()
    token = store.create_staged("blobs/ab/key")
    with store.open_staged("blobs/ab/key", token) as writer:
        writer.write(os.urandom(9 * MiB))  # two blocks staged, then the process "dies"
    with store.open_staged("blobs/ab/key", token) as writer:
        writer.write(os.urandom(MiB))
        writer.flush()  # a tail never acknowledged
    assert [(info.key, info.size) for info in store.list_staged()] == [("blobs/ab/key", 9 * MiB)]
    store.abort_staged("blobs/ab/key")
    assert names_in(raw) == []
    with pytest.raises(ResourceNotFoundError):
        raw.get_blob_client("registry/blobs/ab/key").get_block_list("all")
    assert list(store.list_staged()) == []


def test_abort_after_a_commit_that_crashed_keeps_the_object(
    make: Factory, raw: ContainerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process died between Put Block List and removing the marker: the expiry sweep
    will abort the upload, and that must never delete the committed object."""
    store = make()
    monkeypatch.setattr(store, "forget_staged", lambda key: None)  # the crash
    staged_upload(store, "blobs/crash/key", b"committed bytes", "sha256:c")
    assert [info.key for info in store.list_staged()] == ["blobs/crash/key"]
    make().abort_staged("blobs/crash/key")
    assert b"".join(store.read("blobs/crash/key")) == b"committed bytes"
    assert names_in(raw) == ["registry/blobs/crash/key"]


# -- size and speed -----------------------------------------------------------------------------
def test_a_200_mib_staged_upload_holds_one_block_in_memory(make: Factory) -> None:
    store = make(block_size=8 * MiB)
    peak, tokens, piece = stage_200_mib(store, "blobs/big/staged")
    assert all(len(token) < 64 for token in tokens)
    print(f"peak {peak / MiB:.1f} MiB")
    assert peak < 8 * MiB + 4 * MiB, f"peak {peak / MiB:.1f} MiB for a 200 MiB upload"
    hasher = hashlib.sha256()
    largest = 0
    for chunk in store.read("blobs/big/staged"):
        hasher.update(chunk)
        largest = max(largest, len(chunk))
    assert hasher.hexdigest() == hashlib.sha256(piece * 200).hexdigest()
    assert largest == MiB


def test_a_read_is_one_streamed_get_holding_little_memory(make: Factory) -> None:
    """The SDK's download_blob would hold each ranged request whole and then some (an 8 MiB
    range peaks at 72 MiB); a read here streams one GET's body."""
    store = make()
    data = os.urandom(24 * MiB + 5)
    store.put("blobs/rd/key", [data])
    for start, end in [(0, None), (MiB + 1, 20 * MiB)]:
        tracemalloc.start()
        try:
            received = b"".join(chunk[:1] for chunk in store.read("blobs/rd/key", start, end))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * MiB, f"peak {peak / MiB:.1f} MiB for a read of {start}-{end}"
        assert len(received) == -(-len(data[start:end]) // MiB)  # in 1 MiB pieces
    assert b"".join(store.read("blobs/rd/key", MiB + 1, 20 * MiB)) == data[MiB + 1 : 20 * MiB]


def test_block_ids_chain_the_upload_in_order(make: Factory, raw: ContainerClient) -> None:
    """Ids all have one length (Azure requires it) and name offset, self and predecessor."""
    store = make(block_size=1 * MiB)
    staged_upload(store, "blobs/ids/key", os.urandom(3 * MiB + 1))
    committed, _ = raw.get_blob_client("registry/blobs/ids/key").get_block_list("committed")
    decoded = [base64.b64decode(block.id).decode() for block in committed]
    assert {len(block.id) for block in committed} == {60}
    assert [int(raw_id[:12], 16) for raw_id in decoded] == [0, MiB, 2 * MiB, 3 * MiB]
    assert decoded[0][28:] == "0" * 16
    assert all(later[28:] == earlier[12:28] for earlier, later in itertools.pairwise(decoded))


# -- failures and configuration ------------------------------------------------------------------------
def test_an_unreachable_endpoint_fails_within_seconds_with_default_settings() -> None:
    """The SDK's own retry waits over a minute against a closed port; ours must not."""
    store = AzureBackend(**backend_settings(connection_string(f"127.0.0.1:{free_port()}"), "gone"))
    for call in (store.check, lambda: store.put("blobs/x/y", [b"x"]), lambda: store.read("blobs/x/y")):
        started = time.monotonic()
        with pytest.raises(BackendError) as caught:
            call()
        assert not isinstance(caught.value, ObjectNotFound)
        assert time.monotonic() - started < 5
    started = time.monotonic()
    assert store.delete_many([f"blobs/x/{i}" for i in range(600)]) == [f"blobs/x/{i}" for i in range(600)]
    assert time.monotonic() - started < 5, "one failed batch must not be retried key by key"


def test_a_store_that_accepts_but_never_answers_times_out(make: Factory) -> None:
    """Timeouts must reach the transport (the SDK drops them when it is given one)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections complete in the kernel; nothing ever answers
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        store = AzureBackend(**backend_settings(connection_string(endpoint), "x", timeout=1, max_attempts=2))
        started = time.monotonic()
        with pytest.raises(BackendError):
            store.read("blobs/x/y")
        assert time.monotonic() - started < 6


def test_a_missing_container_is_a_store_failure_not_a_missing_key(azure_server: AzuriteServer) -> None:
    store = AzureBackend(**azure_server.settings("no-such-container"))
    for call in (store.check, lambda: store.read("blobs/x/y"), lambda: store.stat("blobs/x/y")):
        with pytest.raises(BackendError, match="container does not exist") as caught:
            call()
        assert not isinstance(caught.value, ObjectNotFound)


def test_connection_string_from_the_environment(
    azure_server: AzuriteServer, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azure_server.connection_string)
    store = AzureBackend(container=container)
    store.put("blobs/env/key", [b"env"])
    assert b"".join(store.read("blobs/env/key")) == b"env"


def test_account_url_with_a_shared_key(azure_server: AzuriteServer, container: str) -> None:
    store = AzureBackend(container=container, account_url=azure_server.blob_url, account_key=ACCOUNT_KEY)
    store.put("blobs/url/key", [b"by url"])
    assert httpx.get(store.presigned_url("blobs/url/key", 60)).content == b"by url"


def test_delete_many_goes_one_by_one_where_batches_are_refused(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make()
    keys = [f"blobs/nb/{i}" for i in range(20)]
    for key in keys:
        store.put(key, [b"x"])

    def refuse(*names: str, **options: Any) -> Any:
        raise HttpResponseError(message="batch not supported on this account")

    monkeypatch.setattr(store.container, "delete_blobs", refuse)
    assert store.delete_many([*keys, "blobs/nb/never", "not a key"]) == ["not a key"]
    assert list(store.list("blobs/nb/")) == []


def test_reads_past_the_end_yield_nothing_but_missing_keys_still_fail(make: Factory) -> None:
    store = make()
    store.put("blobs/edge/key", [b"0123456789"])
    assert b"".join(store.read("blobs/edge/key", 10)) == b""
    assert b"".join(store.read("blobs/edge/key", 4, 4)) == b""
    assert b"".join(store.read("blobs/edge/key", 8, 100)) == b"89"
    with pytest.raises(ObjectNotFound):
        store.read("blobs/edge/missing", 3, 3)
    with pytest.raises(ObjectNotFound):
        store.read("blobs/edge/missing", 5)
