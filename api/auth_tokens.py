"""Registry bearer tokens: short-lived JWTs in the Docker token format.

Claims: ``iss`` (``auth.issuer``), ``sub`` (the identity, or ``anonymous``), ``aud``
(``auth.service``), ``iat``/``nbf``/``exp``, ``jti``, ``use`` (``access`` or ``refresh``),
``adm`` (the admin role), and for access tokens ``access``: ``[{"type": "repository",
"name": ..., "actions": [...]}]``, only the actions the identity may do.

Keys: EdDSA (Ed25519, the default) or ES256 keys are generated into
``<data_dir>/auth/token-<alg>.pem`` (mode 0600) by the first worker that starts; the
others read the same file (linked into place atomically, so racing workers agree).
HS256 uses ``auth.secret``. Verification pins the one configured algorithm, so
``alg: none`` and algorithm confusion (an HS256 token "signed" with the public key)
are rejected, and requires every claim above.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

REQUIRED_CLAIMS = ["iss", "sub", "aud", "iat", "exp", "nbf", "jti"]
LEEWAY_SECONDS = 5


class InvalidToken(Exception):
    """A token that is malformed, badly signed, expired, or for someone else."""


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    issued_at: float
    expires_in: int


def _load_or_create_key(path: Path, algorithm: str) -> Any:
    if not path.exists():
        key: Any = (
            ed25519.Ed25519PrivateKey.generate()
            if algorithm == "EdDSA"
            else ec.generate_private_key(ec.SECP256R1())
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_once(path, pem)
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


class TokenAuthority:
    def __init__(
        self, *, algorithm: str, issuer: str, service: str, key_dir: Path | None, secret: str | None
    ) -> None:
        self.algorithm = algorithm
        self.issuer = issuer
        self.service = service
        if algorithm == "HS256":
            assert secret is not None
            self._signing: Any = secret.encode()
            self._verifying: Any = self._signing
        else:
            assert key_dir is not None
            private = _load_or_create_key(key_dir / f"token-{algorithm.lower()}.pem", algorithm)
            self._signing = private
            self._verifying = private.public_key()

    def issue(
        self,
        subject: str,
        ttl: float,
        *,
        use: str = "access",
        access: list[dict[str, Any]] | None = None,
        admin: bool = False,
        not_after: float | None = None,
        now: float | None = None,
    ) -> IssuedToken:
        issued = int(now if now is not None else time.time())
        expires = issued + int(ttl)
        if not_after is not None:  # a robot's token never outlives the robot
            expires = min(expires, int(not_after))
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "iat": issued,
            "nbf": issued,
            "exp": expires,
            "jti": secrets.token_urlsafe(12),
            "use": use,
            "adm": admin,
        }
        if use == "access":
            claims["access"] = access or []
        token = jwt.encode(claims, self._signing, algorithm=self.algorithm)
        return IssuedToken(token, issued, max(expires - issued, 0))

    def verify(self, token: str, use: str = "access") -> dict[str, Any]:
        try:
            claims = jwt.decode(
                token,
                self._verifying,
                algorithms=[self.algorithm],  # pinned: never what the token's header says
                audience=self.service,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": REQUIRED_CLAIMS, "verify_signature": True},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from None
        if claims.get("use") != use or not isinstance(claims.get("sub"), str):
            raise InvalidToken(f"not an {use} token")
        if use == "access" and not isinstance(claims.get("access"), list):
            raise InvalidToken("no access claim")
        return claims


def write_once(path: Path, data: bytes) -> bytes:
    """Create the secret file ``path`` (0600) holding ``data`` unless it exists, and return what
    it holds: when several workers start at once, the first to link its file wins for all."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".key-")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            with contextlib.suppress(FileExistsError):  # another worker got there first
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    return path.read_bytes()
