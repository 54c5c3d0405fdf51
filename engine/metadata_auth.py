"""SQL for access control: identities (users and robot accounts) and the audit log.

Part of the metadata layer (all SQL lives in ``metadata*.py`` and the migrations);
``identities`` and ``audit`` hold the logic. Tables are drawn in ``schema.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cargohold.engine.metadata import Conn, MetadataStore


@dataclass(frozen=True, slots=True)
class IdentityRow:
    name: str
    kind: str  # "user" or "robot"
    secret_hash: str
    admin: bool
    description: str
    created_at: float
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    at: float
    actor: str
    address: str | None
    action: str
    repository: str | None
    detail: str | None


_IDENTITY = "SELECT name, kind, secret_hash, admin, description, created_at, expires_at FROM identities"


def _identity(row: tuple[object, ...]) -> IdentityRow:
    name, kind, secret_hash, admin, description, created_at, expires_at = row
    return IdentityRow(
        str(name),
        str(kind),
        str(secret_hash),
        bool(admin),
        str(description or ""),
        float(created_at),
        None if expires_at is None else float(expires_at),  # type: ignore[arg-type]
    )


class AuthQueries:
    """The statements of identities and the audit log, on the registry's metadata store."""

    def __init__(self, store: MetadataStore) -> None:
        self.store = store

    # -- identities -------------------------------------------------------------------------
    def identity(self, name: str) -> IdentityRow | None:
        row = self.store.read().execute(_IDENTITY + " WHERE name = ?", (name,)).fetchone()
        return None if row is None else _identity(row)

    def identities(self, kind: str) -> list[IdentityRow]:
        rows = self.store.read().execute(_IDENTITY + " WHERE kind = ? ORDER BY name", (kind,))
        return [_identity(row) for row in rows]

    def put_identity(self, row: IdentityRow, *, replace: bool) -> bool:
        """Insert (or, with ``replace``, overwrite) an identity; False if it exists and not replacing."""
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with self.store.write() as conn:
            cursor = conn.execute(
                f"{verb} INTO identities (name, kind, secret_hash, admin, description, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    row.name,
                    row.kind,
                    row.secret_hash,
                    int(row.admin),
                    row.description,
                    row.created_at,
                    row.expires_at,
                ),
            )
            return cursor.rowcount > 0

    def delete_identity(self, name: str, kind: str) -> bool:
        with self.store.write() as conn:
            return (
                conn.execute("DELETE FROM identities WHERE name = ? AND kind = ?", (name, kind)).rowcount > 0
            )

    # -- audit log --------------------------------------------------------------------------
    def append_audit(
        self,
        at: float,
        actor: str,
        address: str | None,
        action: str,
        repository: str | None,
        detail: str | None,
        conn: Conn | None = None,
    ) -> None:
        """In its own transaction, or in the caller's ``conn`` (an entry that must commit, or
        roll back, with the change it records)."""
        if conn is not None:
            conn.execute(
                "INSERT INTO audit_log (at, actor, address, action, repository, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (at, actor, address, action, repository, detail),
            )
            return
        with self.store.write() as own:
            self.append_audit(at, actor, address, action, repository, detail, own)

    def audit_rows(self, since: float, actor: str | None, limit: int) -> list[AuditRow]:
        sql = "SELECT id, at, actor, address, action, repository, detail FROM audit_log WHERE at >= ?"
        params: list[object] = [since]
        if actor is not None:
            sql += " AND actor = ?"
            params.append(actor)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        rows = self.store.read().execute(sql, params).fetchall()
        return [AuditRow(*row) for row in reversed(rows)]

    def prune_audit(self, before: float) -> int:
        with self.store.write() as conn:
            return conn.execute("DELETE FROM audit_log WHERE at < ?", (before,)).rowcount
