"""Who may log in: users with passwords and robot accounts with long random secrets.

Passwords are hashed with argon2id (``argon2-cffi``); bcrypt hashes imported from an
htpasswd file are kept as they are and verified with ``bcrypt``, so an operator can
move from Distribution's htpasswd auth without resetting anyone. Robot secrets are
32 random bytes, so a single SHA-256 is enough to store them (no dictionary to slow
down) and checking them costs nothing on the request path.

Every comparison of a secret is constant-time, and an unknown name costs the same as a
wrong secret (a dummy argon2 verification, or a SHA-256 one for ``robot$`` names), so
timing does not tell which names exist.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from cargohold.engine.metadata import MetadataStore
from cargohold.engine.metadata_auth import AuthQueries, IdentityRow

ROBOT_PREFIX = "robot$"
# Names that policies use as principals: no identity may be called that.
RESERVED = frozenset({"anonymous", "authenticated", "admin-token"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_BCRYPT = ("$2y$", "$2b$", "$2a$")
_SHA256 = "sha256$"

_hasher = PasswordHasher()
_DUMMY = _hasher.hash("cargohold timing equaliser")
_DUMMY_ROBOT = _SHA256 + "0" * 64


class IdentityError(ValueError):
    """A bad name, a duplicate, or an htpasswd line that cannot be imported."""


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller. ``expires_at`` is a robot's expiry (None: never)."""

    name: str
    kind: str
    admin: bool = False
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class IdentityInfo:
    name: str
    kind: str
    admin: bool
    description: str
    created_at: float
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class HtpasswdImport:
    imported: list[str]
    skipped: list[str]  # "name: reason"


def check_identity_name(name: str) -> str:
    if name in RESERVED or not _NAME.fullmatch(name):
        raise IdentityError(f"invalid name {name!r}: use letters, digits, . _ @ - (at most 64)")
    return name


def _verify(secret_hash: str, secret: str) -> bool:
    if secret_hash.startswith(_SHA256):
        digest = hashlib.sha256(secret.encode()).hexdigest()
        return hmac.compare_digest(secret_hash[len(_SHA256) :].encode(), digest.encode())
    if secret_hash.startswith(_BCRYPT):
        try:
            return bcrypt.checkpw(secret.encode()[:72], secret_hash.encode())
        except ValueError:
            return False
    try:
        return _hasher.verify(secret_hash, secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class Identities:
    """Users and robot accounts in the metadata store."""

    def __init__(self, store: MetadataStore) -> None:
        self.queries = AuthQueries(store)

    # -- verification -----------------------------------------------------------------------
    def verify(self, name: str, secret: str, now: float | None = None) -> Identity | None:
        """The identity if ``secret`` is right and it has not expired; None otherwise."""
        row = self.queries.identity(name) if len(name) <= 80 else None
        if row is None:
            # The same cost as a wrong secret of that kind (robots are checked with SHA-256).
            _verify(_DUMMY_ROBOT if name.startswith(ROBOT_PREFIX) else _DUMMY, secret)
            return None
        if not _verify(row.secret_hash, secret):
            return None
        if row.expires_at is not None and row.expires_at <= (now or time.time()):
            return None
        return Identity(row.name, row.kind, row.admin, row.expires_at)

    def current(self, name: str, now: float | None = None) -> Identity | None:
        """The identity as it stands now (for refresh tokens): None if removed or expired."""
        row = self.queries.identity(name)
        if row is None or (row.expires_at is not None and row.expires_at <= (now or time.time())):
            return None
        return Identity(row.name, row.kind, row.admin, row.expires_at)

    # -- users ------------------------------------------------------------------------------
    def add_user(self, name: str, password: str, *, admin: bool = False, replace: bool = False) -> None:
        check_identity_name(name)
        if len(password) < 8:
            raise IdentityError("a password needs at least 8 characters")
        row = IdentityRow(name, "user", _hasher.hash(password), admin, "", time.time(), None)
        if not self.queries.put_identity(row, replace=replace):
            raise IdentityError(f"{name} already exists")

    def import_htpasswd(self, lines: Iterable[str], *, replace: bool = False) -> HtpasswdImport:
        """Import ``name:hash`` lines with bcrypt hashes (``htpasswd -B``); others are skipped."""
        imported: list[str] = []
        skipped: list[str] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, secret_hash = line.partition(":")
            if not sep or not secret_hash.startswith(_BCRYPT):
                skipped.append(f"{name}: not a bcrypt entry (use htpasswd -B)")
                continue
            try:
                check_identity_name(name)
            except IdentityError as exc:
                skipped.append(f"{name}: {exc}")
                continue
            row = IdentityRow(name, "user", secret_hash, False, "imported from htpasswd", time.time(), None)
            if self.queries.put_identity(row, replace=replace):
                imported.append(name)
            else:
                skipped.append(f"{name}: already exists")
        return HtpasswdImport(imported, skipped)

    def import_htpasswd_file(self, path: Path, *, replace: bool = False) -> HtpasswdImport:
        return self.import_htpasswd(path.read_text().splitlines(), replace=replace)

    # -- robots -----------------------------------------------------------------------------
    def add_robot(
        self, name: str, *, description: str = "", expires_in: float | None = None
    ) -> tuple[str, str]:
        """Create ``robot$<name>``; returns (full name, secret). The secret is shown only here."""
        full = name if name.startswith(ROBOT_PREFIX) else ROBOT_PREFIX + name
        check_identity_name(full.removeprefix(ROBOT_PREFIX))
        secret = secrets.token_urlsafe(32)
        now = time.time()
        row = IdentityRow(
            full,
            "robot",
            _SHA256 + hashlib.sha256(secret.encode()).hexdigest(),
            False,
            description,
            now,
            None if expires_in is None else now + expires_in,
        )
        if not self.queries.put_identity(row, replace=False):
            raise IdentityError(f"{full} already exists")
        return full, secret

    # -- both -------------------------------------------------------------------------------
    def remove(self, name: str, kind: str) -> bool:
        if kind == "robot" and not name.startswith(ROBOT_PREFIX):
            name = ROBOT_PREFIX + name
        return self.queries.delete_identity(name, kind)

    def list(self, kind: str) -> list[IdentityInfo]:
        return [
            IdentityInfo(r.name, r.kind, r.admin, r.description, r.created_at, r.expires_at)
            for r in self.queries.identities(kind)
        ]
