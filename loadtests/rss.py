"""Peak memory of a server's whole process tree, sampled in a background thread.

Servers may fork workers, so the number that matters is the tree's total, not the parent's.
Two totals are kept: RSS summed over the tree (what "peak RSS" usually means, but pages
shared between forked workers count once per process, so it overstates a multi-worker
server) and PSS (shared pages split between their users: the tree's real footprint).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

try:
    import psutil
except ImportError:  # the /proc fallback below covers Linux without it
    psutil = None


@dataclass(frozen=True)
class TreeMemory:
    """Bytes resident for a process and all its descendants."""

    rss: int
    pss: int
    processes: int


def _tree_pids(pid: int) -> list[int]:
    if psutil is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
        return []
    pids, todo = [], [pid]
    while todo:  # /proc/PID/task/TID/children lists each thread's children
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(child) for child in task.read_text().split())
    return pids


def _rss_pss(pid: int) -> tuple[int, int]:
    """RSS and PSS from smaps_rollup (one cheap read; psutil reads the same file)."""
    rss = pss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    return rss, pss


def tree_memory(pid: int) -> TreeMemory:
    """Current RSS and PSS totals of ``pid`` and its descendants (zeros once it has exited)."""
    pids = _tree_pids(pid)
    totals = [_rss_pss(p) for p in pids]
    return TreeMemory(sum(t[0] for t in totals), sum(t[1] for t in totals), len(pids))


class PeakMemory:
    """Context manager recording the highest tree RSS and PSS seen while it is active.

    Sampling every 20 ms can miss a shorter spike, but a buffering bug that holds a
    large blob in memory lasts for the whole transfer, which is what this is for.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.start = TreeMemory(0, 0, 0)
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _update(self) -> None:
        now = tree_memory(self.pid)
        self.peak_rss = max(self.peak_rss, now.rss)
        self.peak_pss = max(self.peak_pss, now.pss)

    def _sample(self) -> None:
        while os.path.exists(f"/proc/{self.pid}"):
            self._update()
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        self.start = tree_memory(self.pid)
        self.peak_rss, self.peak_pss = self.start.rss, self.start.pss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._update()
