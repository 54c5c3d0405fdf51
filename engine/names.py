"""Repository names and tags, validated against the OCI distribution grammar.

Validation is the first line of defence: a name that passes can neither escape a
storage root nor smuggle anything into SQL (which is parametrized anyway).
"""

from __future__ import annotations

import re

from cargohold.engine.errors import ManifestInvalid, NameInvalid

NAME_MAX = 255
_NAME = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")


def check_name(name: str) -> str:
    if len(name) > NAME_MAX or not _NAME.fullmatch(name):
        raise NameInvalid("invalid repository name", detail={"name": name[:NAME_MAX]})
    return name


def is_valid_tag(tag: str) -> bool:
    return _TAG.fullmatch(tag) is not None


def check_tag(tag: str) -> str:
    if not is_valid_tag(tag):
        raise ManifestInvalid("invalid tag", detail={"tag": tag[:128]})
    return tag
