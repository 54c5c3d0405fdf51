"""Credentials: Basic, and the Docker bearer-token flow (401 with a Bearer challenge →
a token from the realm, with the credentials → the request again with the token)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cargohold.config import ReplicationSettings
from cargohold.engine import Registry
from cargohold.replication import ReplicationService, replication_status
from cargohold.replication.auth import AuthFailed
from tests.engine.conftest import push_image
from tests.replication.gate import AuthGate
from tests.replication.support import digest_of_tag
from tests.support.servers import RegistryProcess


@pytest.fixture(scope="module")
def upstream() -> Iterator[RegistryProcess]:
    with RegistryProcess(env={"CARGOHOLD_WORKERS": "1"}) as server:
        yield server


def service(registry: Registry, url: str, password: str = "s3cret") -> ReplicationService:
    settings = ReplicationSettings(
        targets=[{"name": "gated", "url": url, "username": "robot", "password": password}],
        rules=[{"name": "to-gated", "target": "gated", "repositories": ["team/*"]}],
        chunk_size="64KiB",  # the large layer goes in PATCHes, which cannot be replayed after a 401
        max_attempts=1,
    )
    return ReplicationService(registry, settings)


@pytest.mark.parametrize("mode", ["bearer", "basic"])
def test_replication_authenticates_the_way_the_target_asks(
    registry: Registry, upstream: RegistryProcess, mode: str
) -> None:
    gate = AuthGate(upstream.url, mode, "robot", "s3cret")
    repo = f"team/{mode}"
    digest = push_image(registry, repo, "v1", b'{"mode":"%s"}' % mode.encode(), [os.urandom(300_000)])
    replication = service(registry, gate.url)
    try:
        replication.reconcile("to-gated")
        report = replication.drain(["to-gated"], timeout=60)
    finally:
        replication.close()
        gate.close()
    assert (report.succeeded, report.dead, report.waiting) == (1, 0, 0), report.errors
    assert digest_of_tag(upstream.url, repo, "v1") == digest
    assert gate.passed > 5 and gate.refused >= 1
    if mode == "bearer":
        scopes = {scope for query in gate.token_requests for scope in query.get("scope", [])}
        assert f"repository:{repo}:pull,push" in scopes
        assert all(query.get("service") == ["gate"] for query in gate.token_requests)
    else:
        assert gate.token_requests == []


def test_wrong_credentials_end_in_the_dead_letters_with_the_reason(
    registry: Registry, upstream: RegistryProcess
) -> None:
    gate = AuthGate(upstream.url, "bearer", "robot", "s3cret")
    push_image(registry, "team/denied", "v1", b'{"a":1}', [b"layer"])
    replication = service(registry, gate.url, password="wrong")
    try:
        with pytest.raises(AuthFailed, match="401"):
            replication.reconcile("to-gated")  # it cannot even list the target's tags
        report = replication.drain(["to-gated"], timeout=30)  # the push event's job
    finally:
        replication.close()
        gate.close()
    assert report.dead == 1 and report.succeeded == 0
    (rule,) = replication_status(registry)
    assert rule["jobs"]["dead"] == 1 and rule["failures"] == 1
    assert "token realm answered 401" in rule["last_error"]
    assert digest_of_tag(upstream.url, "team/denied", "v1") is None
