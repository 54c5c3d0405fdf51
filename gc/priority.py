"""Background work yields the CPU to requests: it runs at a lower scheduling priority.

A GC or retention run shares the machine with the server's workers. At a lower priority it
still uses every idle cycle, but when pushes and pulls need the CPUs they get them first.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_at_lower_priority(work: Callable[[], T], nice: int) -> T:
    """Run ``work`` in a fresh thread ``nice`` steps lower in CPU priority, and wait for it.

    A fresh thread, because an unprivileged process can lower a priority but never raise it
    again, and the calling thread may go on to serve requests. Linux gives each thread its
    own priority; elsewhere ``work`` runs at the usual one.
    """
    if nice <= 0:
        return work()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        _lower_this_thread(nice)
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=body, name="cargohold-background", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _lower_this_thread(nice: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):  # not allowed here (a sandbox): the usual priority
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
