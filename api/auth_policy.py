"""Permissions: which actions (pull, push, delete) an identity has on a repository.

Policies come from the ``auth:`` section of the config. Each names a repository glob
(``*`` one path segment, ``**`` any number of them) and the principals granted each
action: user names, robot names, ``authenticated`` (any valid identity) and
``anonymous`` (everyone, with or without credentials). The most specific matching glob
wins: the longest once its wildcards are left out (``team-a/prod/**`` over ``team-a/**``),
then the one with fewer ``**`` (``team-a/*`` over ``team-a/**``), then the one listed
first; where none matches, ``default`` applies. Identities with the admin role may do everything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cargohold.config import AuthSettings
from cargohold.engine.identities import Identity
from cargohold.engine.names import repository_glob

ACTIONS = ("pull", "push", "delete")
ALL = frozenset(ACTIONS)
NOTHING: frozenset[str] = frozenset()


def _specificity(rule: _Rule) -> tuple[int, int]:
    """Most specific first: more literal characters, then fewer ``**`` (``team-a/*`` before ``team-a/**``)."""
    literal = len(rule.glob.replace("*", ""))
    return -literal, rule.glob.count("**")


@dataclass(frozen=True, slots=True)
class _Rule:
    glob: str
    pattern: re.Pattern[str] | None  # None: the default
    grants: dict[str, frozenset[str]]  # action -> principals


class Policies:
    def __init__(self, settings: AuthSettings) -> None:
        rules = [
            _Rule(
                p.repositories,
                repository_glob(p.repositories),
                {"pull": frozenset(p.pull), "push": frozenset(p.push), "delete": frozenset(p.delete)},
            )
            for p in settings.policies
        ]
        # Stable sort: among equally specific globs the first listed stays first.
        self.rules = sorted(rules, key=_specificity)
        d = settings.default
        self.default = _Rule(
            "(default)",
            None,
            {"pull": frozenset(d.pull), "push": frozenset(d.push), "delete": frozenset(d.delete)},
        )
        self.admins = frozenset(settings.admins)

    def is_admin(self, identity: Identity | None) -> bool:
        return identity is not None and (identity.admin or identity.name in self.admins)

    def rule_for(self, repository: str) -> _Rule:
        for rule in self.rules:
            assert rule.pattern is not None
            if rule.pattern.fullmatch(repository):
                return rule
        return self.default

    def allowed(self, identity: Identity | None, repository: str) -> frozenset[str]:
        """The actions ``identity`` (None: anonymous) has on ``repository``."""
        if self.is_admin(identity):
            return ALL
        principals = {"anonymous"}
        if identity is not None:
            principals |= {"authenticated", identity.name}
        grants = self.rule_for(repository).grants
        return frozenset(a for a in ACTIONS if grants[a] & principals)
