"""Opaque catalog cursors: a place in the repository list that names no repository.

With access control on, ``_catalog`` shows a caller only what it may pull, and scans at most
a bounded number of names per request, so a caller who may see little cannot make one
request walk a million hidden names. A page cut short that way must still say where to go
on, and the last name it looked at may be one the caller may not see: the ``last`` of its
``Link`` is that name sealed (AES-GCM under a key kept in ``<data_dir>/auth/``), which the
caller can hand back but not read. A sealed cursor starts with "~", which no repository
name can.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cargohold.api.auth_tokens import write_once
from cargohold.engine.errors import PaginationInvalid

SEALED = "~"


class CursorSeal:
    def __init__(self, key_dir: Path) -> None:
        self._aead = AESGCM(write_once(key_dir / "cursor.key", AESGCM.generate_key(bit_length=256)))

    def seal(self, name: str) -> str:
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, name.encode(), b"catalog")
        return SEALED + base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def open(self, cursor: str) -> str:
        """The name a sealed cursor stands for; ``PaginationInvalid`` if it is not one of ours."""
        try:
            payload = cursor[len(SEALED) :]
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            return self._aead.decrypt(raw[:12], raw[12:], b"catalog").decode()
        except (ValueError, InvalidTag):
            raise PaginationInvalid("last is not a cursor this registry gave") from None
