"""Peak resident memory of a server's whole process tree, sampled in a background thread.

Servers may fork workers, so the number that matters is the tree's total, not the parent's.
RSS counts pages shared between forked workers once per process: the sum is an upper bound.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

try:
    import psutil
except ImportError:  # the /proc fallback below covers Linux without it
    psutil = None


def _tree_rss_psutil(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def _tree_rss_proc(pid: int) -> int:
    """Same as the psutil variant from /proc: parent links from /proc/*/stat, VmRSS from status."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def tree_rss(pid: int) -> int:
    """Current RSS in bytes of ``pid`` and all its descendants."""
    return _tree_rss_psutil(pid) if psutil is not None else _tree_rss_proc(pid)


class PeakRss:
    """Context manager recording the highest tree RSS seen while it is active.

    Sampling every 20 ms can miss a shorter spike, but a buffering bug that holds a
    large blob in memory lasts for the whole transfer, which is what this is for.
    """

    def __init__(self, pid: int, interval: float = 0.02 if psutil is not None else 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            if not os.path.exists(f"/proc/{self.pid}"):
                return
            self.peak = max(self.peak, tree_rss(self.pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRss:
        self.peak = tree_rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, tree_rss(self.pid))
