"""The GC yields to requests: a lower CPU priority, and pauses while others write."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

from cargohold.engine import MetadataStore
from cargohold.gc import Pacing
from cargohold.gc.priority import run_at_lower_priority


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_work_runs_lower_and_the_caller_keeps_its_priority() -> None:
    before = own_nice()
    seen = run_at_lower_priority(own_nice, 5)
    assert seen == min(19, before + 5)
    assert own_nice() == before
    assert run_at_lower_priority(own_nice, 0) == before  # nice 0: runs here, unchanged


def test_results_and_errors_reach_the_caller() -> None:
    assert run_at_lower_priority(lambda: 42, 3) == 42
    with pytest.raises(ZeroDivisionError):
        run_at_lower_priority(lambda: 1 // 0, 3)


def test_pacing_pauses_longer_only_while_others_write() -> None:
    pacing = Pacing(always=0.5, when_busy=2.0)
    assert pacing.pause(0.1, others_wrote=False) == pytest.approx(0.05)
    assert pacing.pause(0.1, others_wrote=True) == pytest.approx(0.25)
    assert Pacing().pause(3.0, others_wrote=True) == 0.0


def test_data_version_moves_only_for_other_connections(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "metadata.db")
    before = store.data_version()
    with store.write() as conn:  # this thread's own commit
        conn.execute("INSERT INTO leases (name, owner, expires_at) VALUES ('mine', 'me', 1)")
    assert store.data_version() == before
    other = sqlite3.connect(tmp_path / "metadata.db", isolation_level=None)
    other.execute("INSERT INTO leases (name, owner, expires_at) VALUES ('theirs', 'them', 1)")
    other.close()
    assert store.data_version() != before
