"""Where bytes live in the backend. Every key the engine writes is made here.

::

    blobs/<xx>/<copy-id>     one stored copy of a blob; <copy-id> is a fresh random id
                             chosen when its upload starts, <xx> its first two characters
    backups/metadata-<UTC time>.sqlite
                             consistent snapshots of the metadata store (``engine.backup``)

A copy's key is chosen when its upload starts, never derived from the digest: finishing
an upload never copies bytes to rename them (no S3 server-side copy of a 10 GB layer),
and deleting an old copy can never remove bytes that a newer row points to, even when
the same digest is re-uploaded while the old copy is being removed. The digest travels
with each object as backend metadata (``digest``), so the store can be audited without
the database. Staged uploads are addressed by the same copy id.
"""

from __future__ import annotations

import secrets
import time

BLOB_PREFIX = "blobs/"
BACKUP_PREFIX = "backups/"


def new_copy_id() -> str:
    """A random id for one stored copy (and its upload session): 128 bits, URL-safe hex."""
    return secrets.token_hex(16)


def blob_key(copy_id: str) -> str:
    return f"{BLOB_PREFIX}{copy_id[:2]}/{copy_id}"


def backup_key(when: float) -> str:
    """Names sort by time, so the newest snapshot is the last in key order."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(when))
    return f"{BACKUP_PREFIX}metadata-{stamp}.{int(when * 1000) % 1000:03d}Z.sqlite"
