"""Rate limits: a real two-worker server with access control, and the shared bucket table.

The server trusts X-Forwarded-For from 127.0.0.1, so each test speaks from addresses of
its own (documentation ranges) and never drains another test's buckets. Refill rates are
per minute, so no bucket refills during a test: the counts below are exact.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cargohold.api.ratelimit import RateLimiter, address_key
from cargohold.config import load_settings
from cargohold.runtime import create_asgi_app
from cargohold.tokenbuckets import SLOTS_PER_GROUP, TokenBucketTable
from tests.auth.conftest import basic, error_code, push_image, two_worker_server
from tests.support.oci_layout import build_image
from tests.support.servers import RegistryProcess

CONFIG = """
auth:
  service: cargohold-test
  default:
    pull: [anonymous]
    push: [authenticated]
    delete: [authenticated]
rate_limits:
  pull:
    per_identity: 8/m
    per_address: 5/m
  push:
    per_address: 20/m
    burst: 4
trusted_proxies: ["127.0.0.1"]
"""
PASSWORDS = {"alice": "alice-password", "bob": "bob-password-2"}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    server = two_worker_server(tmp_path_factory.mktemp("rate-limited"), CONFIG, PASSWORDS)
    try:
        # Seeded from an address of its own: four pushes of its burst of four.
        image = build_image((1000,))
        headers = {**basic("alice", PASSWORDS["alice"]), "X-Forwarded-For": "192.0.2.250"}
        push_image(server.url, "lib/app", "v1", image, headers)
        server.image = image  # type: ignore[attr-defined]
        yield server
    finally:
        server.cleanup()


def _one_shot(method: str, url: str, headers: dict[str, str], **kwargs: object) -> httpx.Response:
    """A request on a connection of its own, so that it may land on either worker."""
    with httpx.Client(timeout=30) as client:
        return client.request(method, url, headers=headers, **kwargs)  # type: ignore[arg-type]


def _assert_429(response: httpx.Response, head: bool = False) -> None:
    assert response.status_code == 429, response.text
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    if not head:
        assert error_code(response) == "TOOMANYREQUESTS"
        assert response.headers["content-type"] == "application/json"


def test_pulls_per_address_hold_across_workers(limited: RegistryProcess) -> None:
    url = f"{limited.url}/v2/lib/app/manifests/v1"
    me = {"X-Forwarded-For": "198.51.100.1", "Accept": "application/vnd.oci.image.manifest.v1+json"}
    statuses = [_one_shot("GET", url, me).status_code for _ in range(12)]
    # Five in the burst, then refused: per-process buckets would let each worker give five.
    assert statuses == [200] * 5 + [429] * 7, statuses
    _assert_429(_one_shot("GET", url, me))
    _assert_429(_one_shot("HEAD", url, me), head=True)
    blob = limited.image.config.digest  # type: ignore[attr-defined]
    _assert_429(_one_shot("GET", f"{limited.url}/v2/lib/app/blobs/{blob}", me))
    _assert_429(_one_shot("GET", f"{limited.url}/v2/lib/app/tags/list", me))
    # Another address has its own bucket; /v2/ and health are never limited.
    assert _one_shot("GET", url, {**me, "X-Forwarded-For": "198.51.100.2"}).status_code == 200
    assert _one_shot("GET", f"{limited.url}/healthz", me).status_code == 200
    anonymous_base = _one_shot("GET", f"{limited.url}/v2/", me)
    assert anonymous_base.status_code == 401  # the gate's answer, not a 429
    alice = {**me, **basic("alice", PASSWORDS["alice"])}
    assert _one_shot("GET", f"{limited.url}/v2/", alice).status_code == 200
    # Both workers answered: the limit held across processes, not inside one.
    time.sleep(1.5)  # access lines reach the log within a second
    pids = {
        line["pid"]
        for line in map(json.loads, filter(lambda s: s.startswith('{"method"'), limited.log().splitlines()))
        if line["client"] == "198.51.100.1" and line["path"] == "/v2/lib/app/manifests/v1"
    }
    assert len(pids) == 2, f"all requests went to one worker ({pids}): the test proves nothing"


def test_pulls_per_identity_whatever_the_address(limited: RegistryProcess) -> None:
    url = f"{limited.url}/v2/lib/app/tags/list"
    statuses = []
    for n in range(10):  # a fresh address each time: only the identity's bucket can run dry
        headers = {**basic("bob", PASSWORDS["bob"]), "X-Forwarded-For": f"198.51.100.{100 + n}"}
        statuses.append(_one_shot("GET", url, headers).status_code)
    assert statuses == [200] * 8 + [429] * 2, statuses
    refused = _one_shot("GET", url, {**basic("bob", PASSWORDS["bob"]), "X-Forwarded-For": "198.51.100.99"})
    _assert_429(refused)
    assert "identity" in refused.json()["errors"][0]["message"]
    # Anonymous callers from fresh addresses, and alice, are not bob.
    assert _one_shot("GET", url, {"X-Forwarded-For": "198.51.100.98"}).status_code == 200
    alice = {**basic("alice", PASSWORDS["alice"]), "X-Forwarded-For": "198.51.100.97"}
    assert _one_shot("GET", url, alice).status_code == 200


def test_pushes_have_their_own_buckets(limited: RegistryProcess) -> None:
    me = {**basic("alice", PASSWORDS["alice"]), "X-Forwarded-For": "203.0.113.7"}
    url = f"{limited.url}/v2/lib/push-limits"
    with httpx.Client(timeout=30, headers=me) as client:
        for _ in range(5):  # pulls drained from this address...
            client.get(f"{url}/tags/list")
        assert client.get(f"{url}/tags/list").status_code == 429
        statuses = [client.post(f"{url}/blobs/uploads/").status_code for _ in range(4)]
        assert statuses == [202] * 4  # ...while pushes have a bucket (burst 4) of their own
        refused = client.put(f"{url}/manifests/v1", content=b"{}", headers={"Content-Type": "x/y"})
    _assert_429(refused)
    assert refused.headers["connection"] == "close"  # the refused body may still be on the wire
    deleted = _one_shot("DELETE", f"{url}/manifests/v1", me)
    _assert_429(deleted)  # deletes count as pushes


def test_refusals_are_counted_in_metrics(limited: RegistryProcess) -> None:
    me = {"X-Forwarded-For": "198.51.100.200"}
    for _ in range(7):
        _one_shot("GET", f"{limited.url}/v2/lib/app/tags/list", me)
    text = httpx.get(f"{limited.url}/metrics").text
    counts = {
        line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("cargohold_rate_limited_requests_total{")
    }
    assert counts.get('by="address",kind="pull"', 0) >= 2, counts


# -- in process: the table, the address key, untrusted proxies ---------------------------------


def _take(table: TokenBucketTable, key: str, now: float, rate: float = 1.0, burst: int = 1) -> float:
    return table.take([(key, rate, burst)], now=now)[0]


def test_bucket_refills_at_its_rate_and_allows_its_burst(tmp_path: Path) -> None:
    table = TokenBucketTable(tmp_path / "buckets", 1024, horizon=60)
    now = 1000.0
    assert [_take(table, "k", now, 2.0, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert _take(table, "k", now, 2.0, 3) == pytest.approx(0.5)
    assert _take(table, "k", now + 0.5, 2.0, 3) == 0.0  # one more after half a second
    assert _take(table, "k", now + 0.5, 2.0, 3) > 0
    assert _take(table, "other", now, 2.0, 3) == 0.0
    # A second mapping of the same file (another worker) sees the same bucket.
    other_worker = TokenBucketTable(tmp_path / "buckets", 1024, horizon=60)
    assert _take(other_worker, "k", now + 0.5, 2.0, 3) > 0
    assert _take(other_worker, "k", now + 10, 2.0, 3) == 0.0  # full again after a quiet spell
    table.close()
    other_worker.close()


def test_buckets_of_one_request_are_spent_all_or_none(tmp_path: Path) -> None:
    table = TokenBucketTable(tmp_path / "buckets", SLOTS_PER_GROUP, horizon=60)  # one group
    now = 1000.0
    assert _take(table, "identity", now) == 0.0  # now empty until now+1
    waits = table.take([("address", 1.0, 2), ("identity", 1.0, 1)], now=now)
    assert waits[0] == 0.0 and waits[1] == pytest.approx(1.0)
    # The refused request spent nothing: the address still has both of its tokens.
    assert table.take([("address", 1.0, 2)], now=now) == [0.0]
    assert table.take([("address", 1.0, 2)], now=now) == [0.0]
    assert table.take([("address", 1.0, 2)], now=now)[0] > 0
    # Two new keys of one request in one group get a slot each.
    assert table.take([("a", 1.0, 1), ("b", 1.0, 1)], now=now) == [0.0, 0.0]
    assert _take(table, "a", now) > 0 and _take(table, "b", now) > 0


def test_table_stays_bounded_and_forgets_idle_buckets_first(tmp_path: Path) -> None:
    path = tmp_path / "buckets"
    table = TokenBucketTable(path, 1024, horizon=60)
    size = path.stat().st_size
    now = 1000.0
    for n in range(20_000):  # far more keys than slots: the file does not grow
        _take(table, f"client-{n}", now)
    assert path.stat().st_size == size == 1024 * 16
    # A single group: eight busy buckets, then a ninth key arrives.
    small = TokenBucketTable(tmp_path / "one-group", SLOTS_PER_GROUP, horizon=60)
    for n in range(SLOTS_PER_GROUP):
        assert _take(small, f"k{n}", now + n / 10) == 0.0
    assert _take(small, "late", now + 0.75) == 0.0
    # k0's bucket was the closest to full, so k0 was forgotten (it starts over); k7 was not.
    assert _take(small, "k7", now + 0.75) > 0
    assert _take(small, "k0", now + 0.75) == 0.0
    # Once idle (full again), buckets free their slots: none of the new keys is refused.
    assert all(_take(small, f"new{n}", now + 5) == 0.0 for n in range(SLOTS_PER_GROUP))
    # A time beyond the horizon is a leftover of an earlier boot: it counts as empty.
    reboot = TokenBucketTable(tmp_path / "reboot", 1024, horizon=60)
    _take(reboot, "k", 1_000_000.0)
    assert _take(reboot, "k", 5.0) == 0.0
    for t in (table, small, reboot):
        t.close()


def test_address_key_groups_ipv6_by_64() -> None:
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:2") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"


def test_forwarded_for_only_from_trusted_proxies(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path,
        metrics=False,
        rate_limits={"pull": {"per_address": "2/m"}},
        trusted_proxies=["10.0.0.0/8"],
    )
    app = create_asgi_app(settings)

    async def statuses(client_address: str, forwarded: list[str]) -> list[int]:
        transport = httpx.ASGITransport(app=app, client=(client_address, 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as client:
            return [
                (await client.get("/v2/a/tags/list", headers={"X-Forwarded-For": f})).status_code
                for f in forwarded
            ]

    # From an untrusted peer the header is ignored: three "different" clients, one bucket.
    assert asyncio.run(statuses("198.51.100.7", ["1.1.1.1", "2.2.2.2", "3.3.3.3"])) == [404, 404, 429]
    # From a trusted proxy each named client has its own bucket.
    assert asyncio.run(statuses("10.1.2.3", ["1.1.1.1", "2.2.2.2", "3.3.3.3", "1.1.1.1"])) == [404] * 4
    assert asyncio.run(statuses("10.1.2.3", ["1.1.1.1"])) == [429]


def test_no_section_no_limiter(tmp_path: Path) -> None:
    def chain(app: object) -> list[type]:
        found = []
        while app is not None:
            found.append(type(app))
            app = getattr(app, "app", None)
        return found

    open_registry = create_asgi_app(load_settings(data_dir=tmp_path, metrics=False))
    assert RateLimiter not in chain(open_registry)
    assert not (tmp_path / "ratelimit.buckets").exists()
    limited = create_asgi_app(
        load_settings(data_dir=tmp_path, metrics=False, rate_limits={"push": {"per_identity": "1/s"}})
    )
    assert RateLimiter in chain(limited)


class _CountingTable(TokenBucketTable):
    calls = 0

    def take(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        return super().take(*args, **kwargs)


def _asgi_get(app: object, path: str = "/v2/a/tags/list") -> tuple[int, dict[str, str]]:
    async def call() -> tuple[int, dict[str, str]]:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as client:
            response = await client.get(path)
            return response.status_code, dict(response.headers)

    return asyncio.run(call())


async def _not_found(scope: object, receive: object, send: object) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]


def test_a_worker_refuses_a_flood_from_memory(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, rate_limits={"pull": {"per_address": "1/m"}}).rate_limits
    assert settings is not None
    table = _CountingTable(tmp_path / "buckets", 1024, horizon=RateLimiter.horizon(settings))
    limiter = RateLimiter(_not_found, settings, table)
    assert _asgi_get(limiter)[0] == 404
    status, headers = _asgi_get(limiter)
    assert status == 429 and 55 <= int(headers["retry-after"]) <= 60
    assert table.calls == 2
    for _ in range(20):  # the bucket is known to be empty for a minute: the table is not asked
        status, headers = _asgi_get(limiter)
        assert status == 429 and int(headers["retry-after"]) >= 1
    assert table.calls == 2


def test_a_stuck_worker_does_not_stop_the_others(tmp_path: Path) -> None:
    """Another process holds the table's lock and never lets go: requests here are not held
    up for longer than LOCK_PATIENCE (they go through uncounted)."""
    import subprocess
    import sys

    settings = load_settings(data_dir=tmp_path, rate_limits={"pull": {"per_address": "1/m"}}).rate_limits
    assert settings is not None
    table = TokenBucketTable(tmp_path / "buckets", 1024, horizon=60)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(tmp_path / 'buckets')!r}, os.O_RDWR)\n"
            f"fcntl.lockf(fd, fcntl.LOCK_EX, 1, {table.groups * 128})\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert table.take([("k", 1.0, 1)], block=False) is None  # the lock really is held
        limiter = RateLimiter(_not_found, settings, table)
        started = time.monotonic()
        assert [_asgi_get(limiter)[0] for _ in range(3)] == [404, 404, 404]  # 1/m, yet not refused
        assert time.monotonic() - started < 3 * 0.1 + 1.0
    finally:
        holder.kill()
        holder.wait(10)
    assert table.take([("k", 1.0, 1)], block=False) == [0.0]  # the kernel released the dead holder's lock
