"""Digests: parsing by the OCI grammar and the hashers behind them.

Only sha256 (the default) and sha512 identify content. Everything else in the
grammar is well-formed but unsupported, which answers DIGEST_INVALID.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cargohold.engine.errors import DigestInvalid

_GRAMMAR = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_ENCODED = {"sha256": re.compile(r"[a-f0-9]{64}"), "sha512": re.compile(r"[a-f0-9]{128}")}
ALGORITHMS = tuple(_ENCODED)
EMPTY_SHA256 = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def is_digest(text: str) -> bool:
    """True when ``text`` looks like a digest at all (as opposed to a tag)."""
    return ":" in text


def parse_digest(text: str) -> Digest:
    """Parse and validate ``algorithm:hex``; anything else raises DigestInvalid."""
    if len(text) > 256 or not _GRAMMAR.fullmatch(text):
        raise DigestInvalid("invalid digest format", detail={"digest": text[:256]})
    algorithm, _, encoded = text.partition(":")
    pattern = _ENCODED.get(algorithm)
    if pattern is None:
        raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}", detail={"digest": text})
    if not pattern.fullmatch(encoded):
        raise DigestInvalid(f"invalid {algorithm} digest", detail={"digest": text})
    return Digest(algorithm, encoded)


def check_algorithm(algorithm: str) -> str:
    if algorithm not in _ENCODED:
        raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}")
    return algorithm


def new_hasher(algorithm: str) -> Any:
    return hashlib.new(check_algorithm(algorithm))


def digest_bytes(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
