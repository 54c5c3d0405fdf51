"""Read-only mode: every write is refused while reads go on (maintenance, restores).

The switch has a default from the config file and can be flipped at run time through
the admin API; the run-time value lives in the metadata store so that every worker
process and node sees it, and each process re-reads it at most once a second.
"""

from __future__ import annotations

import threading
import time

from cargohold.engine.errors import ReadOnly
from cargohold.engine.metadata import MetadataStore
from cargohold.engine.metadata_jobs import JobQueries

SETTING = "read_only"
CACHE_SECONDS = 1.0


class ReadOnlySwitch:
    def __init__(self, store: MetadataStore, default: bool) -> None:
        self.store = store
        self.default = default
        self._queries = JobQueries(store)
        self._lock = threading.Lock()
        self._cached: tuple[float, bool] = (0.0, default)

    def enabled(self) -> bool:
        checked_at, value = self._cached
        if time.monotonic() - checked_at < CACHE_SECONDS:
            return value
        stored = self._queries.admin_setting(self.store.read(), SETTING)
        value = self.default if stored is None else stored == "true"
        with self._lock:
            self._cached = (time.monotonic(), value)
        return value

    def set(self, enabled: bool | None) -> None:
        """Turn read-only mode on or off for every process; None goes back to the config's value."""
        with self.store.write() as conn:
            self._queries.set_admin_setting(conn, SETTING, None if enabled is None else str(enabled).lower())
        with self._lock:
            self._cached = (0.0, self.default)

    def check(self) -> None:
        if self.enabled():
            raise ReadOnly()
