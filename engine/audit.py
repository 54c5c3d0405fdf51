"""The audit log: who did what, from which address, and when.

Written for logins (token issues, failed ones too), pushes, deletes and changes made
through the admin API or the CLI; read by ``cargohold audit``. Rows older than the
configured retention are pruned.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from cargohold.engine.metadata import Conn, MetadataStore
from cargohold.engine.metadata_auth import AuthQueries


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    address: str | None
    action: str
    repository: str | None
    detail: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class AuditLog:
    def __init__(self, store: MetadataStore) -> None:
        self.queries = AuthQueries(store)

    def record(
        self,
        actor: str,
        action: str,
        *,
        address: str | None = None,
        repository: str | None = None,
        detail: dict[str, Any] | None = None,
        at: float | None = None,
        conn: Conn | None = None,
    ) -> None:
        """``conn``: inside the caller's write transaction, to commit with the change it records."""
        self.queries.append_audit(
            at or time.time(),
            actor,
            address,
            action,
            repository,
            None if detail is None else json.dumps(detail, separators=(",", ":"), sort_keys=True),
            conn,
        )

    def entries(self, *, since: float = 0.0, actor: str | None = None, limit: int = 1000) -> list[AuditEntry]:
        return [
            AuditEntry(
                r.id,
                r.at,
                r.actor,
                r.address,
                r.action,
                r.repository,
                None if r.detail is None else json.loads(r.detail),
            )
            for r in self.queries.audit_rows(since, actor, limit)
        ]

    def prune(self, keep_seconds: float, now: float | None = None) -> int:
        return self.queries.prune_audit((now or time.time()) - keep_seconds)
