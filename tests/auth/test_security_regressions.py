"""Regressions of published registry and JWT vulnerabilities, over real HTTP: each test fails
if its protection goes away.

Covered elsewhere and not repeated here: ``alg: none``, tampered, expired and foreign-key
tokens and HS256 "signed" with the EdDSA public key (the permission matrix in
``test_permissions``); ``../``, ``%2e%2e``, encoded slashes and NUL in names, and bad ``n``
on an open registry (``tests/api/test_hostile_input``, ``test_listing``). Added here: the
same attacks where access control or ES256 change the code path, JWT header injection
(``jwk``, ``jku``, ``x5u``, ``x5c``, ``kid``), crafted scope strings, audience, issuer and
not-before checks, constant-time secret comparison, oversized credentials and forms,
CR/LF and Host header injection, and Location headers.
"""

from __future__ import annotations

import ast
import base64
import hmac
import http.server
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from starlette.requests import Request

from cargohold.api.auth_tokens import TokenAuthority
from cargohold.engine import MetadataStore
from cargohold.engine.identities import Identities
from tests.api.oci import raw_request
from tests.auth.conftest import PASSWORD, AuthRegistry, basic, bearer, error_code
from tests.support.oci_layout import OCI_MANIFEST, build_image, sha256_digest
from tests.support.servers import RegistryProcess
from tests.support.tls import make_certificates

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "cargohold-test"  # auth_registry's
EVERYTHING = ["pull", "push", "delete"]
PAGE_CODES = ("PAGINATION_NUMBER_INVALID", "UNSUPPORTED")


def _claims(subject: str = "writer", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "cargohold",
        "sub": subject,
        "aud": SERVICE,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "forged",
        "use": "access",
        "adm": True,
        "access": [
            {"type": "repository", "name": n, "actions": EVERYTHING} for n in ("team-a/app", "secret/hidden")
        ],
    }
    claims.update(extra)
    return claims


def _refused_as_invalid(url: str, token: str) -> bool:
    response = httpx.get(f"{url}/v2/secret/hidden/tags/list", headers=bearer(token))
    return response.status_code == 401 and 'error="invalid_token"' in response.headers["www-authenticate"]


def _raw(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, list[tuple[str, str]], bytes]:
    """One request written byte for byte (headers no client library would send); the
    status, the headers as sent (values undecoded but for latin-1) and the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        length = int(dict(headers).get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body


# -- pagination under access control -----------------------------------------------------------


@pytest.mark.parametrize("n", ["99999999999999999999999999", "1000000000"])
def test_huge_n_is_capped_for_filtered_callers(auth_registry: AuthRegistry, n: str) -> None:
    reader = basic("reader", PASSWORD["reader"])
    catalog = httpx.get(f"{auth_registry.url}/v2/_catalog", params={"n": n}, headers=reader)
    tags = httpx.get(f"{auth_registry.url}/v2/team-a/app/tags/list", params={"n": n}, headers=reader)
    for response in (catalog, tags):  # clamped to the configured page size, or refused
        assert response.status_code in (200, 400), response.text
        if response.status_code == 400:
            assert error_code(response) in PAGE_CODES
    if catalog.status_code == 200:
        names = catalog.json()["repositories"]
        assert "secret/hidden" not in names and len(names) <= 1000
    if tags.status_code == 200:
        assert tags.json()["tags"] == ["v1"]


@pytest.mark.parametrize("n", ["-1", "abc", "1.5", "1e3", "0x10", "+5"])
def test_malformed_n_is_a_pagination_error_for_filtered_callers(auth_registry: AuthRegistry, n: str) -> None:
    reader = basic("reader", PASSWORD["reader"])
    for path in ("/v2/_catalog", "/v2/team-a/app/tags/list"):
        response = httpx.get(f"{auth_registry.url}{path}", params={"n": n}, headers=reader)
        assert response.status_code == 400 and error_code(response) in PAGE_CODES, path


# -- path traversal ----------------------------------------------------------------------------

TRAVERSALS = [
    # (method, path): names, upload ids, tags and digests that try to leave the store
    ("POST", "/v2/..%2f..%2f..%2fpwned-a/blobs/uploads/"),
    ("POST", "/v2/%2e%2e/%2e%2e/%2e%2e/pwned-b/blobs/uploads/"),
    ("POST", "/v2/a/%2E%2E/%2E%2E/%2E%2E/pwned-c/blobs/uploads/"),
    ("POST", "/v2/..\\..\\..\\pwned-d/blobs/uploads/"),
    ("POST", "/v2/a%5c..%5c..%5cpwned-e/blobs/uploads/"),
    ("POST", "/v2/a%00/../pwned-f/blobs/uploads/"),
    ("POST", "/v2/a/./pwned-g/blobs/uploads/"),
    ("POST", "/v2/%252e%252e%252fpwned-h/blobs/uploads/"),  # double encoding
    ("PUT", "/v2/a/manifests/..%2f..%2f..%2fpwned-i"),
    ("PUT", "/v2/a/manifests/..\\..\\pwned-j"),
    ("PATCH", "/v2/a/blobs/uploads/..%2f..%2f..%2fpwned-k"),
    ("PATCH", "/v2/a/blobs/uploads/..\\..\\..\\pwned-l"),
    ("PATCH", "/v2/a/blobs/uploads/%2e%2e%5c%2e%2e%5cpwned-m"),
    ("PUT", "/v2/a/blobs/uploads/..%2f..%2fpwned-n?digest={digest}"),
    ("GET", "/v2/a/blobs/sha256:..%2f..%2f..%2fpwned-o"),
]
# A mount from a name that is not one falls back to a plain upload session, as the spec says.
MOUNT_TRAVERSAL = "/v2/a/blobs/uploads/?mount={digest}&from=..%2f..%2fpwned-p"


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[RegistryProcess]:
    """A registry whose data directory sits alone inside ``tmp_path``: anything written
    outside it is an escape."""
    with RegistryProcess(data_dir=tmp_path / "inside" / "data") as server:
        yield server


def test_traversal_never_reaches_the_filesystem(sandbox: RegistryProcess, tmp_path: Path) -> None:
    body = b"escaped bytes"
    digest = sha256_digest(body)
    outcomes = []
    for method, template in TRAVERSALS:
        path = template.format(digest=digest)
        headers = {"Content-Type": OCI_MANIFEST} if "/manifests/" in path else {}
        response = raw_request(sandbox.url, method, path, headers, body if method != "GET" else b"")
        outcomes.append((method, path, response.status))
        assert 400 <= response.status < 500, f"{method} {path}: {response.status} {response.body[:200]!r}"
        assert response.json()["errors"][0]["code"] in (
            "NAME_INVALID",
            "NAME_UNKNOWN",
            "TAG_INVALID",
            "MANIFEST_INVALID",
            "BLOB_UPLOAD_UNKNOWN",
            "BLOB_UPLOAD_INVALID",
            "DIGEST_INVALID",
            "UNSUPPORTED",
        ), f"{method} {path}: {response.body[:200]!r}"
    mount = raw_request(sandbox.url, "POST", MOUNT_TRAVERSAL.format(digest=digest))
    assert mount.status in (202, 400, 404), mount.body[:200]
    if mount.status == 202:
        assert mount.headers["location"].startswith("/v2/a/blobs/uploads/")
    escaped = [str(p) for p in tmp_path.rglob("*pwned*")]
    assert escaped == [], f"written outside the store: {escaped} ({outcomes})"
    catalog = httpx.get(f"{sandbox.url}/v2/_catalog").json()["repositories"]
    assert not [name for name in catalog if "pwned" in name]


# -- JWT header injection and key confusion ----------------------------------------------------


class _CountingServer:
    """A local HTTP server that would hand out an attacker's keys (JWKS, certificates) and
    counts every request: a verifier that follows ``jku``/``x5u`` would show up here."""

    def __init__(self, payload: bytes) -> None:
        hits: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.hits = hits
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def test_key_material_in_the_token_header_is_ignored(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    attacker = ed25519.Ed25519PrivateKey.generate()
    jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(attacker.public_key()))
    jwk["kid"] = "attacker"
    keys = _CountingServer(json.dumps({"keys": [jwk]}).encode())
    certificate = make_certificates(tmp_path / "x5c").certificate.read_text()
    # A well-formed x5c entry: some certificate's DER.
    der = base64.b64encode(
        x509.load_pem_x509_certificate(certificate.encode()).public_bytes(serialization.Encoding.DER)
    ).decode()
    claims = _claims()
    try:
        injected = {
            "jwk": {"jwk": jwk},
            "jku": {"jku": f"{keys.url}/jwks.json", "kid": "attacker"},
            "x5u": {"x5u": f"{keys.url}/cert.pem"},
            "x5c": {"x5c": [der]},
            "kid-traversal": {"kid": "../../../../../../dev/null"},
            "kid-server-key-name": {"kid": "token-eddsa"},
        }
        for name, header in injected.items():
            token = jwt.encode(claims, attacker, algorithm="EdDSA", headers=header)
            assert _refused_as_invalid(auth_registry.url, token), name
        # The classic kid attack: point kid at an empty file and sign with an empty HMAC key.
        empty = _hs256(claims, b"", {"kid": "/dev/null"})
        assert _refused_as_invalid(auth_registry.url, empty)
    finally:
        keys.close()
    assert keys.hits == [], f"the registry fetched keys named by a token: {keys.hits}"


@pytest.fixture(scope="module")
def es256_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    data_dir = tmp_path_factory.mktemp("es256")
    (data_dir / "cargohold.yaml").write_text(
        "auth:\n  service: cargohold-es\n  algorithm: ES256\n"
        "  external_url: https://registry.example.com\n  default: {pull: [alice]}\n"
    )
    store = MetadataStore(data_dir / "metadata.db")
    Identities(store).add_user("alice", "alice-password")
    store.close()
    with RegistryProcess(
        data_dir=data_dir, env={"CARGOHOLD_CONFIG": str(data_dir / "cargohold.yaml")}
    ) as server:
        yield server


def _hs256(claims: dict[str, Any], key: bytes, extra_header: dict[str, str] | None = None) -> str:
    """HS256 with any key, even one PyJWT rightly refuses (a PEM public key, an empty one)."""
    fields = {"alg": "HS256", "typ": "JWT", **(extra_header or {})}
    header = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    signing_input = header + b"." + payload
    signature = base64.urlsafe_b64encode(hmac.new(key, signing_input, "sha256").digest()).rstrip(b"=")
    return (signing_input + b"." + signature).decode()


def test_algorithm_confusion_against_es256(es256_registry: RegistryProcess) -> None:
    assert es256_registry.data_dir is not None
    server_key = TokenAuthority(
        algorithm="ES256",
        issuer="cargohold",
        service="cargohold-es",
        key_dir=es256_registry.data_dir / "auth",
        secret=None,
    )._verifying
    claims = _claims("alice", aud="cargohold-es")
    public_forms = {
        "pem": server_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "der": server_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "point": server_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        ),
    }
    url = es256_registry.url
    for form, key in public_forms.items():
        assert _refused_as_invalid(url, _hs256(claims, key)), form
    assert _refused_as_invalid(url, jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), "ES256"))
    assert _refused_as_invalid(url, jwt.encode(claims, ed25519.Ed25519PrivateKey.generate(), "EdDSA"))
    assert _refused_as_invalid(url, jwt.encode(claims, None, algorithm="none"))
    # The control: a token the registry issued passes the gate (a 404: alice may look).
    token = httpx.get(
        f"{url}/auth/token",
        params={"scope": "repository:secret/hidden:pull"},
        auth=("alice", "alice-password"),
    ).json()["token"]
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert httpx.get(f"{url}/v2/secret/hidden/tags/list", headers=bearer(token)).status_code == 404


def test_audience_issuer_and_validity_window_are_checked(auth_registry: AuthRegistry) -> None:
    def authority(issuer: str = "cargohold", service: str = SERVICE) -> TokenAuthority:
        return TokenAuthority(
            algorithm="EdDSA",
            issuer=issuer,
            service=service,
            key_dir=auth_registry.data_dir / "auth",
            secret=None,
        )

    access = _claims()["access"]
    url = auth_registry.url
    good = authority().issue("writer", 300, access=access).token
    assert not _refused_as_invalid(url, good)  # the control: the same key, the right claims
    assert _refused_as_invalid(
        url, authority(service="another-registry").issue("writer", 300, access=access).token
    )
    assert _refused_as_invalid(
        url, authority(issuer="someone-else").issue("writer", 300, access=access).token
    )
    not_yet = authority().issue("writer", 300, access=access, now=time.time() + 600).token
    assert _refused_as_invalid(url, not_yet)
    expired = authority().issue("writer", 60, access=access, now=time.time() - 120).token
    assert _refused_as_invalid(url, expired)
    # An access token is no refresh token.
    refreshed = httpx.post(f"{url}/auth/token", data={"grant_type": "refresh_token", "refresh_token": good})
    assert refreshed.status_code == 401


# -- crafted scopes ----------------------------------------------------------------------------

CRAFTED_SCOPES = [
    "repository:team-a/app:push",
    "repository:team-a/app:pull,push,delete",
    "repository:team-a/app:*",
    "repository:team-a/app:PUSH,Delete",
    "repository:team-a/app:pull;push",
    "repository:team-a/app:pull push",
    "repository:team-a/../secret/hidden:pull,push",
    "repository:team-a/app/../../secret/hidden:pull",
    "repository:team-a/%2e%2e/secret/hidden:pull",
    "repository:127.0.0.1:5000/secret/hidden:pull",
    "repository:secret/hidden:pull:push",
    "repository:team\u2010a/app:push",  # a Unicode hyphen
    "repository:\uff54eam-a/app:push",  # a fullwidth t
    "repository:secret/hidden\u0000:pull",
    "repository:secret/hidden/:pull",
    "repository:Secret/Hidden:pull",
    "repository:secret/*:pull",
    "repository:**:pull,push",
    "registry:catalog:*",
    "repository::pull,push",
    "repository:team-a/app",
]


def test_crafted_scopes_grant_nothing_beyond_policy(auth_registry: AuthRegistry) -> None:
    url = f"{auth_registry.url}/auth/token"
    # Every crafted string in scope parameters of their own, and all of them in one
    # space-separated parameter.
    params = [
        ("service", SERVICE),
        *(("scope", s) for s in CRAFTED_SCOPES),
        ("scope", " ".join(CRAFTED_SCOPES)),
    ]
    response = httpx.get(url, params=params, auth=("reader", PASSWORD["reader"]))
    assert response.status_code == 200, response.text
    token = response.json()["token"]
    granted = jwt.decode(token, options={"verify_signature": False})["access"]
    assert granted == [{"type": "repository", "name": "team-a/app", "actions": ["pull"]}]
    # And the token does nothing more on the wire.
    headers = bearer(token)
    assert httpx.post(f"{auth_registry.url}/v2/team-a/app/blobs/uploads/", headers=headers).status_code == 403
    assert httpx.get(f"{auth_registry.url}/v2/secret/hidden/tags/list", headers=headers).status_code == 403
    assert httpx.get(f"{auth_registry.url}/v2/team-a/app/tags/list", headers=headers).status_code == 200
    # The most specific glob wins against a broader grant: writer may not push to team-a/frozen.
    writer = httpx.get(
        url,
        params={"scope": "repository:team-a/frozen/x:pull,push,delete"},
        auth=("writer", PASSWORD["writer"]),
    ).json()["token"]
    assert jwt.decode(writer, options={"verify_signature": False})["access"] == [
        {"type": "repository", "name": "team-a/frozen/x", "actions": ["pull"]}
    ]


# -- secrets are compared in constant time ------------------------------------------------------

_SECRET_WORDS = re.compile(r"secret|password|passwd|token|signature|credential|hmac|api_?key", re.I)


def _identifiers(node: ast.AST) -> list[str]:
    return [
        n.id if isinstance(n, ast.Name) else n.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Name | ast.Attribute)
    ]


def test_no_secret_is_compared_with_equality() -> None:
    """Where credentials are handled (api, engine, core, replication), no ``==``/``!=`` has a
    secret-sounding operand: those go through hmac.compare_digest or a password hasher."""
    found = []
    for folder in ("api", "engine", "cargohold", "replication"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Compare) or not any(
                    isinstance(op, ast.Eq | ast.NotEq) for op in node.ops
                ):
                    continue
                names = [i for side in (node.left, *node.comparators) for i in _identifiers(side)]
                if any(_SECRET_WORDS.search(name) for name in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_the_checker_sees_an_equality_on_a_secret() -> None:
    tree = ast.parse("if given_token == self._token:\n    pass\n")
    compare = next(n for n in ast.walk(tree) if isinstance(n, ast.Compare))
    assert any(_SECRET_WORDS.search(i) for i in _identifiers(compare))


class _Recorder:
    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.real(*args)


class _HasherSpy:
    """argon2's PasswordHasher (whose attributes are read-only) with ``verify`` recorded."""

    def __init__(self, real: Any, verify: _Recorder) -> None:
        self._real = real
        self.verify = verify

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _request(authorization: str) -> Request:
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/admin/x",
            "headers": [(b"authorization", authorization.encode())],
        }
    )


def test_secrets_go_through_constant_time_comparisons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cargohold.api.admin as admin_module
    import cargohold.api.admin_common as admin_common_module
    import cargohold.api.auth_admin as auth_admin_module
    import cargohold.engine.identities as identities_module

    compare = _Recorder(hmac.compare_digest)
    for module in (admin_common_module, identities_module):  # both admin APIs check through admin_common
        monkeypatch.setattr(module.hmac, "compare_digest", compare)
    # The admin break-glass token, on both admin APIs.
    admin = admin_module.AdminAPI.__new__(admin_module.AdminAPI)
    admin._token = b"break-glass"
    identity_admin = auth_admin_module.IdentityAdminAPI.__new__(auth_admin_module.IdentityAdminAPI)
    identity_admin._token = b"break-glass"
    for api in (admin, identity_admin):
        compare.calls.clear()
        assert api._authorized(_request("Bearer break-glass"))
        assert not api._authorized(_request("Bearer break-glasX"))
        assert [c[1] for c in compare.calls] == [b"break-glass", b"break-glass"], type(api)
    # Robot secrets: SHA-256 digests compared with compare_digest.
    identities = Identities(MetadataStore(tmp_path / "m.db"))
    name, secret = identities.add_robot("ci", expires_in=3600)
    compare.calls.clear()
    assert identities.verify(name, secret) is not None
    assert identities.verify(name, secret + "x") is None
    assert len(compare.calls) == 2
    # Passwords: the argon2 hasher's own verify (constant time inside), never ==.
    argon2_verify = _Recorder(identities_module._hasher.verify)
    monkeypatch.setattr(identities_module, "_hasher", _HasherSpy(identities_module._hasher, argon2_verify))
    identities.add_user("alice", "alice-password")
    assert identities.verify("alice", "alice-password") is not None
    assert identities.verify("alice", "wrong-password") is None
    assert identities.verify("nobody", "whatever") is None  # an unknown name costs a verify too
    assert len(argon2_verify.calls) == 3
    # htpasswd bcrypt entries: bcrypt.checkpw.
    import bcrypt

    checkpw = _Recorder(bcrypt.checkpw)
    monkeypatch.setattr(identities_module.bcrypt, "checkpw", checkpw)
    line = "bob:" + bcrypt.hashpw(b"bob-password", bcrypt.gensalt(4)).decode()
    identities.import_htpasswd([line])
    assert identities.verify("bob", "bob-password") is not None
    assert len(checkpw.calls) == 1


# -- oversized credentials and forms ------------------------------------------------------------


def test_oversized_credentials_are_refused_cleanly(auth_registry: AuthRegistry) -> None:
    url = f"{auth_registry.url}/v2/team-a/app/tags/list"
    long_bearer = httpx.get(url, headers=bearer("a" * 20_000))
    assert long_bearer.status_code == 401 and error_code(long_bearer) == "UNAUTHORIZED"
    long_password = httpx.get(url, headers=basic("reader", "x" * 60_000))
    assert long_password.status_code == 401 and error_code(long_password) == "UNAUTHORIZED"
    long_name = httpx.get(url, headers=basic("r" * 10_000, "whatever"))
    assert long_name.status_code == 401
    token = httpx.get(f"{auth_registry.url}/auth/token", headers=basic("reader", "x" * 60_000))
    assert token.status_code == 401 and "token" not in token.json()
    not_base64 = httpx.get(url, headers={"Authorization": "Basic !!!" + "=" * 5000})
    assert not_base64.status_code == 401
    # Beyond what the server parses at all: refused by the HTTP layer, never a 5xx.
    huge = httpx.get(url, headers=basic("reader", "x" * 1_000_000))
    assert huge.status_code in (400, 401, 413, 431)
    # And the registry still answers afterwards.
    assert httpx.get(url, headers=basic("reader", PASSWORD["reader"])).status_code == 200


def test_token_form_is_read_only_up_to_its_limit(auth_registry: AuthRegistry) -> None:
    """An endless form to the unauthenticated token endpoint is cut off after 64 KiB: the
    answer comes while the client is still sending (reading it all first would wait here)."""
    port = int(auth_registry.url.rsplit(":", 1)[1])
    chunk = b"a" * 65536
    request = (
        b"POST /auth/token HTTP/1.1\r\nHost: registry\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"10000\r\n" + chunk + b"\r\n")
        * 4  # 256 KiB, and then nothing more (no last chunk)
    )
    started = time.monotonic()
    status, headers, body = _raw(port, request, timeout=10)
    assert status == 413 and json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    assert ("connection", "close") in headers
    assert time.monotonic() - started < 9


# -- header injection --------------------------------------------------------------------------

CRLF_PATHS = [
    "/v2/team-a/app/manifests/v1%0d%0aSet-Cookie:%20injected=1",
    "/v2/team-a%0d%0aX-Injected:%20yes/app/manifests/v1",
    "/v2/team-a/app%0aX-Injected:%20yes/tags/list",
    "/v2/team-a/app/tags/list?n=1&last=v%0d%0aX-Injected:%20yes",
    "/v2/_catalog?n=1&last=a%0d%0aX-Injected:%20yes",
    "/v2/team-a/app/blobs/uploads/?mount=sha256:{zeros}%0d%0aX-Injected:%20yes&from=team-a/app",
    "/v2/team-a/app/blobs/uploads/?mount=sha256:{zeros}&from=team-a%0d%0aX-Injected:%20yes",
    "/v2/team-a/app/blobs/uploads/%0d%0aX-Injected:%20yes",
]


@pytest.mark.parametrize("path", CRLF_PATHS)
@pytest.mark.parametrize("who", ["anonymous", "writer"])
def test_crlf_is_never_echoed_into_headers(auth_registry: AuthRegistry, path: str, who: str) -> None:
    headers = {} if who == "anonymous" else basic("writer", PASSWORD["writer"])
    method = "POST" if "/uploads/?" in path else "GET"
    response = raw_request(auth_registry.url, method, path.format(zeros="0" * 64), headers)
    assert response.status < 500, response.body[:200]
    assert "set-cookie" not in response.headers and "x-injected" not in response.headers
    for name, value in response.headers.items():
        assert "\r" not in value and "\n" not in value and "injected" not in value.lower(), (name, value)


def test_host_header_cannot_inject_challenge_parameters(auth_registry: AuthRegistry) -> None:
    port = int(auth_registry.url.rsplit(":", 1)[1])
    for host in (
        b'evil.example", scope="repository:secret/hidden:pull,push',
        b"evil.example/path?x=",
        b"evil.example,error=insufficient_scope",
        b"",
    ):
        status, headers, _ = _raw(
            port, b"GET /v2/team-a/app/tags/list HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        )
        assert status == 401
        challenge = dict(headers)["www-authenticate"]
        assert challenge == (
            f'Bearer realm="http://127.0.0.1:{port}/auth/token",service="{SERVICE}",'
            'scope="repository:team-a/app:pull"'
        ), (host, challenge)
    # A plain host name is the client's own choice and is used as given.
    status, headers, _ = _raw(port, b"GET /v2/ HTTP/1.1\r\nHost: registry.internal:5000\r\n\r\n")
    assert 'realm="http://registry.internal:5000/auth/token"' in dict(headers)["www-authenticate"]


def test_external_url_wins_over_any_host_and_forwarded_headers(es256_registry: RegistryProcess) -> None:
    response = httpx.get(
        f"{es256_registry.url}/v2/",
        headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "gopher"},
    )
    assert response.headers["www-authenticate"].startswith(
        'Bearer realm="https://registry.example.com/auth/token"'
    )


def test_forwarded_proto_from_an_untrusted_peer_is_ignored(auth_registry: AuthRegistry) -> None:
    response = httpx.get(
        f"{auth_registry.url}/v2/", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    )
    assert response.headers["www-authenticate"].startswith('Bearer realm="http://127.0.0.1:')


def test_locations_never_carry_another_host(registry: RegistryProcess) -> None:
    """Locations are paths on this registry, whatever Host or X-Forwarded-* a client sends."""
    spoofed = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    image = build_image((3000,))
    repo = f"locations/{int(time.time() * 1000)}"
    locations = []
    with httpx.Client(base_url=registry.url, headers=spoofed, timeout=30) as client:
        started = client.post(f"/v2/{repo}/blobs/uploads/")
        locations.append(started.headers["location"])
        patched = client.patch(started.headers["location"], content=image.config.data)
        locations.append(patched.headers["location"])
        finished = client.put(patched.headers["location"], params={"digest": image.config.digest})
        locations.append(finished.headers["location"])
        for layer in image.layers:
            one_shot = client.post(
                f"/v2/{repo}/blobs/uploads/", params={"digest": layer.blob.digest}, content=layer.blob.data
            )
            locations.append(one_shot.headers["location"])
        mounted = client.post(
            f"/v2/{repo}-copy/blobs/uploads/", params={"mount": image.config.digest, "from": repo}
        )
        locations.append(mounted.headers["location"])
        manifest = client.put(
            f"/v2/{repo}/manifests/v1", content=image.manifest.data, headers={"Content-Type": OCI_MANIFEST}
        )
        locations.append(manifest.headers["location"])
    assert len(locations) == 5 + len(image.layers)
    for location in locations:
        assert location.startswith(f"/v2/{repo}"), location
        assert "evil" not in location and "//" not in location
