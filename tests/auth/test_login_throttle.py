"""Failed logins per address: wrong passwords are counted, past the limit nothing is checked."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.auth.conftest import basic, error_code, two_worker_server
from tests.support.servers import RegistryProcess

CONFIG = """
auth:
  service: cargohold-test
  failed_logins: 3/m
  default:
    pull: [authenticated]
trusted_proxies: ["127.0.0.1"]
"""
PASSWORD = "the-right-password"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    server = two_worker_server(tmp_path_factory.mktemp("login-throttle"), CONFIG, {"alice": PASSWORD})
    try:
        yield server
    finally:
        server.cleanup()


def one_shot(url: str, address: str, password: str, token: bool = False) -> httpx.Response:
    """A request on a connection of its own (either worker may answer) from ``address``."""
    headers = {**basic("alice", password), "X-Forwarded-For": address}
    with httpx.Client(timeout=30) as client:
        if token:
            return client.get(f"{url}/auth/token", params={"service": "cargohold-test"}, headers=headers)
        return client.get(f"{url}/v2/", headers=headers)


def test_wrong_passwords_lock_the_address_out_across_workers(guarded: RegistryProcess) -> None:
    me = "203.0.113.7"
    # Three different wrong passwords (a repeated pair is answered from memory, uncounted).
    statuses = [one_shot(guarded.url, me, f"guess-{n}").status_code for n in range(3)]
    assert statuses == [401, 401, 401]
    locked = [one_shot(guarded.url, me, f"guess-{n}", token=n % 2 == 1) for n in range(3, 9)]
    assert [r.status_code for r in locked] == [429] * 6
    for response in locked:
        assert error_code(response) == "TOOMANYREQUESTS"
        assert int(response.headers["retry-after"]) >= 1
    # Even the right password is not checked now (it would tell a guesser it had won)...
    assert one_shot(guarded.url, me, PASSWORD).status_code == 429
    assert one_shot(guarded.url, me, PASSWORD, token=True).status_code == 429
    # ...while another address logs in as usual.
    assert one_shot(guarded.url, "203.0.113.8", PASSWORD).status_code == 200
    time.sleep(1.5)  # access lines reach the log within a second
    pids = {
        line["pid"]
        for line in map(json.loads, filter(lambda s: s.startswith('{"method"'), guarded.log().splitlines()))
        if line["client"] == me and line["status"] == 429
    }
    assert len(pids) == 2, f"one worker answered every refusal ({pids}): the limit was not shown shared"


def test_right_passwords_are_never_counted(guarded: RegistryProcess) -> None:
    me = "203.0.113.20"
    for _ in range(12):  # four times the limit, through both ways of logging in
        assert one_shot(guarded.url, me, PASSWORD).status_code == 200
        assert one_shot(guarded.url, me, PASSWORD, token=True).status_code == 200
    assert one_shot(guarded.url, me, "wrong").status_code == 401


def test_the_address_may_try_again_once_the_rate_refills(tmp_path: Path) -> None:
    from cargohold.api.login_throttle import LoginThrottle, TooManyLogins

    throttle = LoginThrottle(tmp_path / "logins.buckets", "2/s")
    for _ in range(2):
        throttle.check("192.0.2.1")
        throttle.failed("192.0.2.1")
    throttle.failed("192.0.2.1")  # past the burst: not counted further, just refused
    with pytest.raises(TooManyLogins) as refused:
        throttle.check("192.0.2.1")
    assert 0 < refused.value.retry_after <= 0.5
    throttle.check("2001:db8::1")  # another address
    time.sleep(refused.value.retry_after + 0.05)
    throttle.check("192.0.2.1")
    throttle.close()
