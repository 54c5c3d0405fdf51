"""An offline consistency check of a data directory, for crash tests.

It states what "consistent, nothing lost" means until ``cargohold fsck`` exists:
every live blob row has its stored object with the recorded size and digest, the
refcounts equal the reference rows, every tag names a manifest of its repository,
every manifest reference names a live blob or a manifest of the repository, and
every manifest has its bytes; and ``fsck`` finds nothing.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path


def check_data_dir(data_dir: Path, verify_digests: bool = True) -> list[str]:
    """Return a list of problems (empty when the store is consistent)."""
    problems: list[str] = []
    db = sqlite3.connect(data_dir / "metadata.db")
    objects = data_dir / "blobs" / "objects"
    try:
        for digest, key, size, state in db.execute("SELECT digest, storage_key, size, state FROM blobs"):
            if state != "live":
                continue
            path = objects / key
            if not path.is_file():
                problems.append(f"blob {digest}: stored object {key} is missing")
                continue
            if path.stat().st_size != size:
                problems.append(f"blob {digest}: object size {path.stat().st_size} != recorded {size}")
            elif verify_digests:
                algorithm, _, expected = digest.partition(":")
                hasher = hashlib.new(algorithm)
                with open(path, "rb") as handle:
                    while chunk := handle.read(1 << 20):
                        hasher.update(chunk)
                if hasher.hexdigest() != expected:
                    problems.append(f"blob {digest}: stored bytes do not match the digest")
        for (digest,) in db.execute(
            "SELECT b.digest FROM blobs b WHERE b.manifest_refs != "
            "(SELECT COUNT(*) FROM manifest_references r "
            "WHERE r.target_digest = b.digest AND r.kind = 'blob') "
            "OR b.repo_links != "
            "(SELECT COUNT(*) FROM repository_blobs rb WHERE rb.digest = b.digest)"
        ):
            problems.append(f"blob {digest}: refcounts differ from the reference rows")
        for repo_id, name in db.execute(
            "SELECT t.repository_id, t.name FROM tags t LEFT JOIN manifests m "
            "ON m.repository_id = t.repository_id AND m.digest = t.manifest_digest WHERE m.digest IS NULL"
        ):
            problems.append(f"tag {name} of repository {repo_id} names no manifest")
        for repo_id, manifest, target, kind in db.execute(
            "SELECT r.repository_id, r.manifest_digest, r.target_digest, r.kind FROM manifest_references r "
            "WHERE (r.kind = 'blob' AND NOT EXISTS (SELECT 1 FROM blobs b WHERE b.digest = r.target_digest "
            "AND b.state = 'live')) OR (r.kind = 'manifest' AND NOT EXISTS (SELECT 1 FROM manifests m "
            "WHERE m.repository_id = r.repository_id AND m.digest = r.target_digest))"
        ):
            problems.append(f"manifest {manifest} in repository {repo_id}: {kind} {target} is missing")
        for (digest,) in db.execute(
            "SELECT m.digest FROM manifests m LEFT JOIN manifest_content c ON c.digest = m.digest "
            "WHERE c.digest IS NULL"
        ):
            problems.append(f"manifest {digest} has no stored bytes")
        for (digest,) in db.execute(
            "SELECT c.digest FROM manifest_content c WHERE c.repo_count != "
            "(SELECT COUNT(*) FROM manifests m WHERE m.digest = c.digest)"
        ):
            problems.append(f"manifest content {digest}: repo_count differs from the manifest rows")
    finally:
        db.close()
    problems.extend(_fsck_findings(data_dir))
    return problems


def _fsck_findings(data_dir: Path) -> list[str]:
    """And what ``cargohold fsck`` says (its own, independent reading of the same store)."""
    from cargohold.backends import FilesystemBackend
    from cargohold.engine import MetadataStore
    from cargohold.engine.fsck import fsck

    store = MetadataStore(data_dir / "metadata.db")
    try:
        report = fsck(store, FilesystemBackend(data_dir / "blobs"))
    finally:
        store.close()
    return [f"fsck: {f.kind} {f.subject} {f.detail}" for f in report.unrepaired]
