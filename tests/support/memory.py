"""Peak memory of processes under test, from the kernel's own high-water mark (VmHWM).

Reading VmHWM at the end sees every spike, however short, which a sampler could miss.
The mark can be reset (``reset_peak``) so that a long-lived process, the test runner
itself for instance, reports the peak of one test rather than of its whole life.
"""

from __future__ import annotations

from pathlib import Path


def process_tree(root_pid: int) -> list[int]:
    """The process and all its descendants."""
    pids, frontier = [root_pid], [root_pid]
    while frontier:
        pid = frontier.pop()
        children = Path(f"/proc/{pid}/task/{pid}/children")
        if children.exists():
            kids = [int(x) for x in children.read_text().split()]
            pids.extend(kids)
            frontier.extend(kids)
    return pids


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def peak_rss(pid: int) -> int:
    return _status_bytes(pid, "VmHWM")


def current_rss(pid: int) -> int:
    return _status_bytes(pid, "VmRSS")


def reset_peak(pid: int) -> None:
    """Start the high-water mark again from the current RSS (Linux 4.0+: ``clear_refs`` 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def tree_peak_rss(root_pid: int) -> dict[int, int]:
    """Peak RSS of each process of the tree, by PID (the sum is the tree's worst case)."""
    return {pid: peak_rss(pid) for pid in process_tree(root_pid)}
