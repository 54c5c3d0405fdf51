"""Repository names and tags, validated against the OCI distribution grammar.

Validation is the first line of defence: a name that passes can neither escape a
storage root nor smuggle anything into SQL (which is parametrized anyway).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

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


def repository_glob(pattern: str) -> re.Pattern[str]:
    """A repository glob, as every feature that scopes by repository reads it (retention,
    replication, webhooks, permissions): ``*`` and ``?`` stay within one path component,
    ``**`` spans components, and ``**/`` may match nothing (``team/**/app`` matches ``team/app``)."""
    parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern)
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(part, re.escape(part)) for part in parts))


def tag_matcher(pattern: str) -> Callable[[str], bool]:
    """A tag pattern: a case-sensitive glob, or ``re:<regex>``; either must match the whole tag."""
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return lambda tag: regex.fullmatch(tag) is not None
    return lambda tag: fnmatch.fnmatchcase(tag, pattern)
