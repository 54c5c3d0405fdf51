"""Immutable tags: once such a tag exists, it names its manifest for good.

A rule names repositories (globs, read as everywhere: ``team/**``) and tag patterns
(globs or ``re:<regex>``, as in retention). A tag a rule covers, once it exists,

* cannot be moved to another digest (pushing the digest it already names is fine:
  nothing changes);
* cannot be deleted;
* keeps its manifest: neither that manifest nor a manifest an index among them lists
  (what a platform pulls) can be deleted by digest;

by anyone: clients, retention, replication and the registry's own jobs. The checks run
inside the write transaction that would make the change and read the rules in force in
that same transaction, so neither a concurrent push nor a concurrent rule change slips
past them.

The rules come from the config file (``immutable_tags:``), or, once an admin stored some
through the admin API, from the metadata store (``admin_settings``), like retention
policies. The only way around them is an ``Override``: an explicit admin action that
deletes a tag or a manifest anyway and is written to the audit log in the same transaction.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

from cargohold.engine.audit import AuditLog
from cargohold.engine.errors import TagImmutable
from cargohold.engine.inventory import StoredPolicies
from cargohold.engine.metadata import Conn, MetadataStore
from cargohold.engine.names import repository_glob, tag_matcher

SETTING = "immutable_tags.rules"  # the admin_settings row of rules stored through the admin API


@dataclass(frozen=True, slots=True)
class ImmutableTagRule:
    repositories: tuple[str, ...]
    tags: tuple[str, ...]

    def as_dict(self) -> dict[str, list[str]]:
        return {"repositories": list(self.repositories), "tags": list(self.tags)}


@dataclass(frozen=True, slots=True)
class Override:
    """Who overrides immutability (an admin), and from where: written to the audit log."""

    actor: str
    address: str | None = None


class _Compiled:
    def __init__(self, rules: Sequence[ImmutableTagRule]) -> None:
        self.rules = list(rules)
        self._compiled: list[tuple[list[re.Pattern[str]], list[Callable[[str], bool]]]] = [
            ([repository_glob(g) for g in rule.repositories], [tag_matcher(t) for t in rule.tags])
            for rule in rules
        ]

    def covers(self, repository: str, tag: str) -> bool:
        return any(
            any(glob.fullmatch(repository) for glob in globs) and any(match(tag) for match in tags)
            for globs, tags in self._compiled
        )


def parse_rules(document: str) -> list[ImmutableTagRule]:
    return [ImmutableTagRule(tuple(r["repositories"]), tuple(r["tags"])) for r in json.loads(document)]


class ImmutableTags:
    def __init__(self, store: MetadataStore, configured: Sequence[ImmutableTagRule] = ()) -> None:
        self.store = store
        self.configured = _Compiled(configured)
        self._stored_rules = StoredPolicies(store, SETTING)
        self._audit = AuditLog(store)
        self._stored: tuple[str, _Compiled] | None = None  # the last stored document, compiled
        self._lock = threading.Lock()

    # -- the rules in force -------------------------------------------------------------------
    def rules(self, conn: Conn | None = None) -> tuple[list[ImmutableTagRule], str]:
        """The rules in force and where they come from ("admin" or "config")."""
        compiled = self._in_force(conn or self.store.read())
        return list(compiled.rules), "config" if compiled is self.configured else "admin"

    def matcher(self) -> Callable[[str, str], bool]:
        """The rules in force now, as a predicate on (repository, tag): for retention plans."""
        return self._in_force(self.store.read()).covers

    def put(self, rules: Sequence[ImmutableTagRule]) -> None:
        """Replace the config file's rules for every process, until ``forget``."""
        self._stored_rules.put(json.dumps([asdict(rule) for rule in rules], separators=(",", ":")))

    def forget(self) -> bool:
        """Go back to the config file's rules; False if none were stored."""
        return self._stored_rules.forget()

    def _in_force(self, conn: Conn) -> _Compiled:
        document = self._stored_rules.get(conn)
        if document is None:
            return self.configured
        with self._lock:
            if self._stored is None or self._stored[0] != document:
                self._stored = (document, _Compiled(parse_rules(document)))
            return self._stored[1]

    # -- the checks, inside the caller's write transaction ------------------------------------
    def check_tags(
        self, conn: Conn, repository_id: int, repository: str, tags: Iterable[str], digest: str
    ) -> None:
        """Refuse to move a covered tag that names another manifest."""
        rules = self._in_force(conn)
        for tag in tags:
            if not rules.covers(repository, tag):
                continue
            current = self.store.resolve_tag(conn, repository, tag)
            if current is not None and current != digest:
                raise TagImmutable(
                    f"tag {tag} is immutable in {repository}: it names {current} and cannot be moved",
                    detail={"repository": repository, "tag": tag, "digest": current},
                )

    def protected_by(
        self, conn: Conn, repository_id: int, repository: str, reference: str, by_digest: bool
    ) -> list[str]:
        """The covered tags that deleting ``reference`` (a tag, or a manifest by digest) would
        remove or leave dangling; empty when the delete may go ahead."""
        rules = self._in_force(conn)
        if not by_digest:
            exists = self.store.resolve_tag(conn, repository, reference) is not None
            return [reference] if exists and rules.covers(repository, reference) else []
        return [
            tag
            for tag in self.store.tags_reaching(conn, repository_id, reference)
            if rules.covers(repository, tag)
        ]

    def check_delete(
        self, conn: Conn, repository_id: int, repository: str, reference: str, by_digest: bool
    ) -> None:
        protected = self.protected_by(conn, repository_id, repository, reference, by_digest)
        if not protected:
            return
        if by_digest:
            message = f"manifest {reference} is kept by immutable tag {protected[0]} in {repository}"
        else:
            message = f"tag {reference} is immutable in {repository} and cannot be deleted"
        raise TagImmutable(message, detail={"repository": repository, "tags": protected[:10]})

    def record_override(
        self,
        conn: Conn,
        repository_id: int,
        repository: str,
        reference: str,
        by_digest: bool,
        override: Override,
    ) -> None:
        """Write the admin's override to the audit log, in the transaction of the delete."""
        protected = self.protected_by(conn, repository_id, repository, reference, by_digest)
        self._audit.record(
            override.actor,
            "immutable-override",
            address=override.address,
            repository=repository,
            detail={"reference": reference, "immutable_tags": protected[:50]},
            conn=conn,
        )


__all__ = ["ImmutableTagRule", "ImmutableTags", "Override", "parse_rules"]
