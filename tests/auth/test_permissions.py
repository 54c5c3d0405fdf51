"""The permission matrix over real HTTP: every /v2/ endpoint kind x every kind of caller.

For repositories a caller may not see, the answer must not depend on whether the
repository (or the tag, or the blob) exists: the response for an existing hidden
repository is compared, byte for byte after swapping the name, with the one for a
repository that does not exist under the same policy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cargohold.api.auth_tokens import TokenAuthority
from tests.auth.conftest import PASSWORD, AuthRegistry, basic, bearer, error_code

NONE_HEADER = b'{"alg":"none","typ":"JWT"}'
HS256_HEADER = b'{"alg":"HS256","typ":"JWT"}'
MISSING_DIGEST = "sha256:" + "0" * 64
ENDPOINTS = [
    # (kind, method, path, action)
    ("manifest-get-tag", "GET", "/v2/{repo}/manifests/v1", "pull"),
    ("manifest-head-tag", "HEAD", "/v2/{repo}/manifests/v1", "pull"),
    ("manifest-get-digest", "GET", "/v2/{repo}/manifests/{manifest}", "pull"),
    ("blob-get", "GET", "/v2/{repo}/blobs/{blob}", "pull"),
    ("blob-head", "HEAD", "/v2/{repo}/blobs/{blob}", "pull"),
    ("tags-list", "GET", "/v2/{repo}/tags/list", "pull"),
    ("referrers", "GET", "/v2/{repo}/referrers/{manifest}", "pull"),
    ("upload-start", "POST", "/v2/{repo}/blobs/uploads/", "push"),
    ("upload-status", "GET", "/v2/{repo}/blobs/uploads/no-such-upload", "push"),
    ("upload-patch", "PATCH", "/v2/{repo}/blobs/uploads/no-such-upload", "push"),
    ("upload-finish", "PUT", "/v2/{repo}/blobs/uploads/no-such-upload?digest=" + MISSING_DIGEST, "push"),
    ("upload-cancel", "DELETE", "/v2/{repo}/blobs/uploads/no-such-upload", "push"),
    ("manifest-put", "PUT", "/v2/{repo}/manifests/matrix", "push"),
    ("manifest-delete", "DELETE", "/v2/{repo}/manifests/" + MISSING_DIGEST, "delete"),
    ("blob-delete", "DELETE", "/v2/{repo}/blobs/" + MISSING_DIGEST, "delete"),
]
REPOS = ["team-a/app", "secret/hidden", "secret/nosuch", "public/base"]
INVALID = [
    "wrong-password",
    "unknown-user",
    "expired-robot",
    "tampered-token",
    "expired-token",
    "alg-none-token",
    "other-key-token",
    "hs256-with-public-key",
    "garbage-bearer",
]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(subject: str, repos: list[str], actions: list[str], **extra: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": "cargohold",
        "sub": subject,
        "aud": "cargohold-test",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "x",
        "use": "access",
        "adm": False,
        "access": [{"type": "repository", "name": r, "actions": actions} for r in repos],
    }
    claims.update(extra)
    return claims


@pytest.fixture(scope="module")
def callers(auth_registry: AuthRegistry) -> dict[str, dict[str, str]]:
    everything = [f"repository:{r}:pull,push,delete" for r in REPOS]
    reader_token = auth_registry.token("reader", *everything)
    header, payload, signature = reader_token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["sub"] = "writer"
    forged["access"] = [
        {"type": "repository", "name": r, "actions": ["pull", "push", "delete"]} for r in REPOS
    ]
    tampered = f"{header}.{_b64(json.dumps(forged).encode())}.{signature}"
    real_key = TokenAuthority(
        algorithm="EdDSA",
        issuer="cargohold",
        service="cargohold-test",
        key_dir=auth_registry.data_dir / "auth",
        secret=None,
    )
    expired = real_key.issue(
        "writer",
        300,
        access=_claims("writer", REPOS, ["pull", "push", "delete"])["access"],
        now=time.time() - 3600,
    ).token  # type: ignore[arg-type]
    writer_everything = _claims("writer", REPOS, ["pull", "push", "delete"])
    alg_none = _b64(NONE_HEADER) + "." + _b64(json.dumps(writer_everything).encode()) + "."
    other_key = jwt.encode(writer_everything, ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA")
    # Algorithm confusion: HS256 "signed" with the server's public key, which anyone may know.
    from cryptography.hazmat.primitives import serialization

    public_pem = real_key._verifying.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = _b64(HS256_HEADER) + "." + _b64(json.dumps(writer_everything).encode())
    confused = (
        f"{signing_input}.{_b64(hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest())}"
    )
    return {
        "anonymous": {},
        "anonymous-token": bearer(auth_registry.token(None, *everything)),
        "reader": bearer(reader_token),
        "writer": bearer(auth_registry.token("writer", *everything)),
        "reader-basic": basic("reader", PASSWORD["reader"]),
        "robot-basic": basic("robot$ci", auth_registry.robot_secret),
        "other-scope": bearer(auth_registry.token("reader", "repository:public/base:pull")),
        "wrong-password": basic("reader", "not-the-password"),
        "unknown-user": basic("nobody", "whatever-password"),
        "expired-robot": basic("robot$old", auth_registry.expired_robot_secret),
        "tampered-token": bearer(tampered),
        "expired-token": bearer(expired),
        "alg-none-token": bearer(alg_none),
        "other-key-token": bearer(other_key),
        "hs256-with-public-key": bearer(confused),
        "garbage-bearer": bearer("not-a-jwt"),
    }


def _expected(caller: str, repo: str, action: str) -> tuple[int, str] | None:
    """(status, code) of a refusal, or None when the request must reach the registry."""
    if caller in ("anonymous", "anonymous-token"):
        return None if (repo == "public/base" and action == "pull") else (401, "UNAUTHORIZED")
    if caller in INVALID:
        return (401, "UNAUTHORIZED")
    may = {
        "reader": {"team-a/app": {"pull"}, "team-a/other": {"pull"}, "public/base": {"pull"}},
        "writer": {
            "team-a/app": {"pull", "push", "delete"},
            "team-a/other": {"pull", "push", "delete"},
            "public/base": {"pull", "push"},
        },
        "robot-basic": {
            "team-a/app": {"pull", "push"},
            "team-a/other": {"pull", "push"},
            "public/base": {"pull"},
        },
    }
    who = {"reader-basic": "reader", "other-scope": "reader"}.get(caller, caller)
    if action in may[who].get(repo, set()):
        if caller == "other-scope" and repo != "public/base":
            return (403, "DENIED")  # the identity may, the token does not: insufficient_scope
        return None
    return (403, "DENIED")


def _request(
    client: httpx.Client, method: str, path: str, headers: dict[str, str], body: bytes
) -> httpx.Response:
    extra = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"} if "manifests" in path else {}
    content = body if method in ("PUT", "PATCH", "POST") else None
    return client.request(method, path, headers={**headers, **extra}, content=content)


def _fill(path: str, repo: str, seed: object, hidden: dict[str, str]) -> str:
    digests = (
        hidden
        if repo.startswith("secret/")
        else {
            "manifest": seed.manifest.digest,
            "blob": seed.layers[0].blob.digest,  # type: ignore[attr-defined]
        }
    )
    return path.format(repo=repo, **digests)


@pytest.fixture(scope="module")
def hidden_digests(auth_registry: AuthRegistry) -> dict[str, str]:
    response = httpx.get(
        f"{auth_registry.url}/v2/secret/hidden/manifests/v1",
        headers={**basic("root", PASSWORD["root"]), "Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert response.status_code == 200
    manifest = response.json()
    return {"manifest": response.headers["docker-content-digest"], "blob": manifest["layers"][0]["digest"]}


def _comparable(response: httpx.Response, name: str) -> tuple[int, bytes, list[tuple[str, str]]]:
    headers = sorted((k, v.replace(name, "NAME")) for k, v in response.headers.items() if k != "date")
    return response.status_code, response.content.replace(name.encode(), b"NAME"), headers


@pytest.mark.parametrize(
    "caller",
    [
        "anonymous",
        "anonymous-token",
        "reader",
        "writer",
        "reader-basic",
        "robot-basic",
        "other-scope",
        *INVALID,
    ],
)
def test_matrix(auth_registry: AuthRegistry, callers, hidden_digests, caller: str) -> None:
    seed = auth_registry.seed  # type: ignore[attr-defined]
    headers = callers[caller]
    failures = []
    client = httpx.Client(base_url=auth_registry.url, timeout=30)
    for kind, method, template, action in ENDPOINTS:
        seen: dict[str, httpx.Response] = {}
        for repo in REPOS:
            path = _fill(template, repo, seed, hidden_digests)
            response = _request(client, method, path, headers, seed.manifest.data)
            seen[repo] = response
            expected = _expected(caller, repo, action)
            got = (response.status_code, error_code(response))
            if method == "HEAD" and expected is not None:  # no body: the status says it all
                expected = (expected[0], None)
            if expected is None:
                if response.status_code in (401, 403):
                    failures.append(f"{kind} {repo}: refused {got}, expected to pass")
            elif got != expected:
                failures.append(f"{kind} {repo}: {got}, expected {expected}")
            challenge = response.headers.get("www-authenticate", "")
            if expected is not None and expected[0] == 403 and 'error="insufficient_scope"' not in challenge:
                failures.append(f"{kind} {repo}: a 403 without an insufficient_scope challenge")
            if expected is not None and expected[0] == 401:
                challenge = response.headers.get("www-authenticate", "")
                if not challenge.startswith('Bearer realm="') or 'service="cargohold-test"' not in challenge:
                    failures.append(f"{kind} {repo}: bad challenge {challenge!r}")
            if expected is not None:
                text = response.text + json.dumps(dict(response.headers))
                for secret in hidden_digests.values():
                    if secret in text and secret not in path:
                        failures.append(f"{kind} {repo}: leaks {secret}")
        # Unknown and forbidden look the same, for every caller.
        if _comparable(seen["secret/hidden"], "secret/hidden") != _comparable(
            seen["secret/nosuch"], "secret/nosuch"
        ):
            failures.append(f"{kind}: secret/hidden and secret/nosuch answer differently")
    client.close()
    assert not failures, "\n".join(failures)


def test_pull_by_permitted_callers_really_serves(auth_registry: AuthRegistry, callers) -> None:
    seed = auth_registry.seed  # type: ignore[attr-defined]
    for caller in ("reader", "writer", "reader-basic", "robot-basic"):
        response = httpx.get(
            f"{auth_registry.url}/v2/team-a/app/blobs/{seed.config.digest}", headers=callers[caller]
        )
        assert response.status_code == 200 and response.content == seed.config.data, caller
    response = httpx.get(f"{auth_registry.url}/v2/public/base/tags/list")
    assert response.json() == {"name": "public/base", "tags": ["v1"]}


def test_base_endpoint(auth_registry: AuthRegistry, callers) -> None:
    for caller, status in (
        ("anonymous", 401),
        ("reader", 200),
        ("reader-basic", 200),
        ("wrong-password", 401),
        ("tampered-token", 401),
        ("alg-none-token", 401),
    ):
        response = httpx.get(f"{auth_registry.url}/v2/", headers=callers[caller])
        assert response.status_code == status, caller
    anonymous_token = auth_registry.token(None)
    assert httpx.get(f"{auth_registry.url}/v2/", headers=bearer(anonymous_token)).status_code == 200


def test_catalog_lists_only_what_the_caller_may_pull(auth_registry: AuthRegistry, callers) -> None:
    url = f"{auth_registry.url}/v2/_catalog"
    response = httpx.get(url)
    assert (
        response.status_code == 401 and 'scope="registry:catalog:*"' in response.headers["www-authenticate"]
    )
    assert httpx.get(url, headers=bearer(auth_registry.token(None))).json() == {
        "repositories": ["public/base"]
    }
    for caller in ("reader", "reader-basic"):
        names = httpx.get(url, headers=callers[caller]).json()["repositories"]
        assert "secret/hidden" not in names and {"team-a/app", "public/base"} <= set(names), caller
    everything = httpx.get(url, headers=basic("root", PASSWORD["root"])).json()["repositories"]
    assert "secret/hidden" in everything
    # Pagination never hints at hidden names: the Link header names only visible ones.
    page = httpx.get(url, params={"n": 1}, headers=callers["reader"])
    assert page.json()["repositories"] == ["public/base"]
    assert "secret" not in page.headers.get("link", "")


def test_mount_needs_pull_on_the_source(auth_registry: AuthRegistry, callers, hidden_digests) -> None:
    hidden_blob = hidden_digests["blob"]
    for params in ({"mount": hidden_blob, "from": "secret/hidden"}, {"mount": hidden_blob}):
        response = httpx.post(
            f"{auth_registry.url}/v2/team-a/app/blobs/uploads/", params=params, headers=callers["writer"]
        )
        assert response.status_code == 202, params  # an upload session: nothing mounted, nothing told
        assert hidden_blob not in json.dumps(dict(response.headers))
    seed = auth_registry.seed  # type: ignore[attr-defined]
    writer = bearer(
        auth_registry.token("writer", "repository:team-a/copy:pull,push", "repository:team-a/app:pull")
    )
    response = httpx.post(
        f"{auth_registry.url}/v2/team-a/copy/blobs/uploads/",
        params={"mount": seed.config.digest, "from": "team-a/app"},
        headers=writer,
    )
    assert response.status_code == 201
    root = basic("root", PASSWORD["root"])
    response = httpx.post(
        f"{auth_registry.url}/v2/team-a/copy/blobs/uploads/",
        params={"mount": hidden_blob, "from": "secret/hidden"},
        headers=root,
    )
    assert response.status_code == 201


def test_insufficient_scope_challenge_names_the_scope(auth_registry: AuthRegistry, callers) -> None:
    response = httpx.get(f"{auth_registry.url}/v2/team-a/app/tags/list", headers=callers["other-scope"])
    assert response.status_code == 403
    challenge = response.headers["www-authenticate"]
    assert 'scope="repository:team-a/app:pull"' in challenge and 'error="insufficient_scope"' in challenge
    response = httpx.get(f"{auth_registry.url}/v2/team-a/app/tags/list", headers=callers["tampered-token"])
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
