"""The GC yields the CPU: it runs in a thread at a lower scheduling priority."""

from __future__ import annotations

import os
import sys
import threading

import pytest

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
