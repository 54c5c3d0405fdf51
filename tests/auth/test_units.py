"""In-process checks of the pieces: policy matching, token keys and algorithms, identities,
and that a registry without ``auth:`` is not wrapped at all."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from cargohold.api.auth import AuthGate, parse_scope
from cargohold.api.auth_policy import Policies
from cargohold.api.auth_tokens import InvalidToken, TokenAuthority
from cargohold.config import AuthSettings, load_settings
from cargohold.engine import MetadataStore
from cargohold.engine.identities import Identities, Identity, IdentityError
from cargohold.runtime import create_asgi_app


def test_longest_glob_wins_and_default_applies() -> None:
    settings = AuthSettings(
        default={"pull": ["authenticated"]},
        admins=["boss"],
        policies=[
            {"repositories": "team-a/**", "pull": ["alice"], "push": ["alice"]},
            {"repositories": "team-a/prod/**", "pull": ["alice"]},
            {"repositories": "team-a/*", "pull": ["bob"]},
            {"repositories": "open/**", "pull": ["anonymous"]},
        ],
    )
    policies = Policies(settings)
    alice, bob = Identity("alice", "user"), Identity("bob", "user")
    assert policies.allowed(alice, "team-a/x/y") == {"pull", "push"}
    assert policies.allowed(alice, "team-a/prod/app") == {"pull"}  # the longer glob, no push
    assert policies.allowed(bob, "team-a/app") == {"pull"} and policies.allowed(alice, "team-a/app") == set()
    assert policies.allowed(bob, "elsewhere") == {"pull"} and policies.allowed(None, "elsewhere") == set()
    assert policies.allowed(None, "open/thing") == {"pull"} and policies.allowed(bob, "open/thing") == {
        "pull"
    }
    assert policies.allowed(Identity("boss", "user"), "team-a/prod/app") == {"pull", "push", "delete"}
    assert policies.allowed(Identity("x", "user", admin=True), "anything") == {"pull", "push", "delete"}


def test_scope_parsing_refuses_crafted_strings() -> None:
    assert parse_scope("repository:team-a/app:pull,push") == ("team-a/app", frozenset({"pull", "push"}))
    assert parse_scope("repository:team-a/app:pull:push") is None  # "team-a/app:pull" is no name
    assert parse_scope("repository:../etc:pull") is None
    assert parse_scope("repository:Team/App:pull") is None
    assert parse_scope("registry:catalog:*") is None
    assert parse_scope("repository:a:" + "pull," * 200) is None
    assert parse_scope("repository:a:admin,pull") == ("a", frozenset({"pull"}))


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256", "HS256"])
def test_tokens_pin_the_algorithm(tmp_path: Path, algorithm: str) -> None:
    secret = "s" * 40 if algorithm == "HS256" else None
    authority = TokenAuthority(
        algorithm=algorithm, issuer="i", service="svc", key_dir=tmp_path / "auth", secret=secret
    )
    token = authority.issue(
        "alice", 60, access=[{"type": "repository", "name": "a", "actions": ["pull"]}]
    ).token
    assert authority.verify(token)["sub"] == "alice"
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    claims = jwt.decode(token, options={"verify_signature": False})
    with pytest.raises(InvalidToken):
        authority.verify(jwt.encode(claims, None, algorithm="none"))
    with pytest.raises(InvalidToken):
        authority.verify(jwt.encode(claims, "another-secret-of-32-characters!!", algorithm="HS256"))
    with pytest.raises(InvalidToken):
        authority.verify(authority.issue("alice", 60, use="refresh").token)  # not an access token
    with pytest.raises(InvalidToken):
        authority.verify(authority.issue("alice", 60, now=time.time() - 3600).token)
    other_service = TokenAuthority(
        algorithm=algorithm, issuer="i", service="other", key_dir=tmp_path / "auth", secret=secret
    )
    with pytest.raises(InvalidToken):
        other_service.verify(token)
    if algorithm != "HS256":  # the key is made once and then reused (a second worker reads it)
        again = TokenAuthority(
            algorithm=algorithm, issuer="i", service="svc", key_dir=tmp_path / "auth", secret=None
        )
        assert again.verify(token)["sub"] == "alice"
        key = tmp_path / "auth" / f"token-{algorithm.lower()}.pem"
        assert key.stat().st_mode & 0o777 == 0o600


def test_hs256_needs_a_long_secret() -> None:
    with pytest.raises(ValueError):
        AuthSettings(algorithm="HS256", secret="short")
    with pytest.raises(ValueError):
        AuthSettings(algorithm="EdDSA", secret="s" * 40)


def test_identities(tmp_path: Path) -> None:
    identities = Identities(MetadataStore(tmp_path / "m.db"))
    identities.add_user("alice", "alice-password")
    with pytest.raises(IdentityError):
        identities.add_user("alice", "another-password")
    with pytest.raises(IdentityError):
        identities.add_user("anonymous", "x-password")
    with pytest.raises(IdentityError):
        identities.add_user("bob", "short")
    assert identities.verify("alice", "alice-password") == Identity("alice", "user")
    assert identities.verify("alice", "wrong") is None and identities.verify("nobody", "x") is None
    name, secret = identities.add_robot("ci", expires_in=3600)
    assert name == "robot$ci" and identities.verify(name, secret) is not None
    assert identities.verify(name, secret, now=time.time() + 7200) is None  # expired
    assert identities.verify(name, secret[:-1]) is None
    assert identities.remove("ci", "robot") and identities.verify(name, secret) is None


def test_without_auth_section_nothing_is_in_front(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, metrics=False)
    assert settings.auth is None
    app = create_asgi_app(settings)
    assert not isinstance(app.app, AuthGate)  # type: ignore[attr-defined]
    guarded = create_asgi_app(load_settings(data_dir=tmp_path, metrics=False, auth={}))
    assert isinstance(guarded.app, AuthGate)  # type: ignore[attr-defined]


def test_audit_prune_keeps_recent_entries(tmp_path: Path) -> None:
    from cargohold.engine.audit import AuditLog

    audit = AuditLog(MetadataStore(tmp_path / "m.db"))
    audit.record("alice", "push", repository="a", at=time.time() - 100 * 86400)
    audit.record("alice", "push", repository="b", address="10.0.0.1", detail={"kind": "manifest"})
    assert audit.prune(90 * 86400) == 1
    (entry,) = audit.entries()
    assert (entry.actor, entry.repository, entry.address, entry.detail) == (
        "alice",
        "b",
        "10.0.0.1",
        {"kind": "manifest"},
    )
    assert audit.entries(actor="bob") == [] and audit.entries(since=time.time() + 10) == []


def test_basic_on_v2_can_be_switched_off(tmp_path: Path) -> None:
    import asyncio

    import httpx

    Identities(MetadataStore(tmp_path / "metadata.db")).add_user("alice", "alice-password")
    settings = load_settings(
        data_dir=tmp_path,
        metrics=False,
        auth={
            "basic": False,
            "external_url": "https://registry.example.com/",
            "default": {"pull": ["alice"]},
        },
    )
    app = create_asgi_app(settings)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as client:
            refused = await client.get("/v2/", auth=("alice", "alice-password"))
            assert refused.status_code == 401
            challenge = refused.headers["www-authenticate"]
            assert challenge.startswith('Bearer realm="https://registry.example.com/auth/token"')
            token = await client.get(
                "/auth/token", params={"scope": "repository:a/b:pull"}, auth=("alice", "alice-password")
            )
            assert token.status_code == 200
            headers = {"Authorization": f"Bearer {token.json()['token']}"}
            assert (await client.get("/v2/", headers=headers)).status_code == 200
            # alice may pull a/b, so she sees its real 404
            assert (await client.get("/v2/a/b/tags/list", headers=headers)).status_code == 404

    asyncio.run(scenario())
