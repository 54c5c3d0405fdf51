"""Pull and touch times, recorded in memory and written in batches.

Recording a pull must not cost a write transaction per request on the hot path, so
each process keeps the newest timestamps in dicts and ``flush()`` writes them in one
transaction (called every few seconds by the server, and on shutdown). The GC's grace
period must be longer than the flush interval, so a blob HEADed by a push in progress
is protected before the sweep can see it as idle.
"""

from __future__ import annotations

import threading
import time

from cargohold.engine.metadata import MetadataStore

FLUSH_INTERVAL_SECONDS = 5.0


class ActivityRecorder:
    def __init__(self, store: MetadataStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._manifest_pulls: dict[tuple[str, str], float] = {}
        self._tag_pulls: dict[tuple[str, str], float] = {}
        self._blob_touches: dict[str, float] = {}

    def manifest_pulled(self, repository: str, digest: str, tag: str | None) -> None:
        now = time.time()
        with self._lock:
            self._manifest_pulls[(repository, digest)] = now
            if tag is not None:
                self._tag_pulls[(repository, tag)] = now

    def blob_touched(self, digest: str) -> None:
        with self._lock:
            self._blob_touches[digest] = time.time()

    def flush(self) -> int:
        """Write everything recorded so far; returns how many records were written."""
        with self._lock:
            manifests, self._manifest_pulls = self._manifest_pulls, {}
            tags, self._tag_pulls = self._tag_pulls, {}
            blobs, self._blob_touches = self._blob_touches, {}
        if not (manifests or tags or blobs):
            return 0
        with self._store.write() as conn:
            self._store.record_manifest_pulls(conn, ((ts, d, r) for (r, d), ts in manifests.items()))
            self._store.record_tag_pulls(conn, ((ts, t, r) for (r, t), ts in tags.items()))
            self._store.touch_blobs(conn, ((ts, d) for d, ts in blobs.items()))
        return len(manifests) + len(tags) + len(blobs)
