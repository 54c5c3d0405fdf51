"""Token buckets shared by every worker process: one small file, mapped into memory.

The server runs several worker processes, and a bucket kept in each one's memory would
multiply every limit by the number of workers (and a client's keep-alive connection
sticks to one worker, so it would not even average out). So every worker maps the same
file and checks a request's buckets under one ``fcntl`` lock: a pair of system calls and
a few struct reads per request (measured: 4 µs in a tight loop, 10-15 µs in a busy server,
where a manifest GET costs 60-70 µs). The lock is held for a few microseconds; a caller
that must not block (an event loop) asks with ``block=False`` and tries again later. A
worker that dies holding it loses it with its process: the kernel releases fcntl locks.

Each bucket is kept the GCRA way (the generic cell rate algorithm): not a token count and
a timestamp but one number, the *theoretical arrival time* (TAT) on the system-wide
monotonic clock. With ``interval = 1 / rate`` and ``tolerance = (burst - 1) * interval``,
a request at ``now`` may go if ``max(TAT, now) - now <= tolerance``, and then moves the
TAT on by one interval. That is exactly a token bucket of ``burst`` tokens refilled at
``rate``, in eight bytes.

Layout of the file (little-endian)::

    slot   fingerprint u64 (0: empty) | TAT f64       16 bytes
    group  8 slots                                    128 bytes
    file   table_slots / 8 groups                     1 MiB for 65,536 slots
    lock   the byte just past the end (fcntl locks may lie beyond a file's end)

A key's 128-bit BLAKE2b hash picks its group and its fingerprint. A bucket whose TAT has
passed is full again and carries no state, so its slot is free for another key: idle
buckets evict themselves and memory stays bounded by the file. When all eight slots of a
group hold live buckets, the one closest to full is forgotten (its key starts over with a
full bucket): under pressure the table errs towards letting a request through, never
towards refusing one it should not. A TAT further ahead than any configured bucket can
reach (a file left over from before a reboot, when the monotonic clock restarted) counts
as empty.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import mmap
import os
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path

SLOTS_PER_GROUP = 8
_GROUP = struct.Struct("<" + "Qd" * SLOTS_PER_GROUP)
_SLOT = struct.Struct("<Qd")


class TokenBucketTable:
    """Buckets by key in a file every worker maps (see the module docstring)."""

    def __init__(self, path: Path, slots: int, horizon: float) -> None:
        """``horizon``: the furthest any bucket's TAT can run ahead of the clock (the largest
        ``burst / rate`` in use); a TAT beyond it is left over from an earlier boot."""
        self.horizon = horizon
        self.groups = max(slots // SLOTS_PER_GROUP, 1)
        self._size = self.groups * _GROUP.size
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < self._size:
            # Only ever grown: another worker may have it mapped, and shrinking a mapped
            # file kills its readers with SIGBUS.
            os.ftruncate(self._fd, self._size)
        self._map = mmap.mmap(self._fd, self._size)
        # fcntl locks belong to the process; this one keeps two threads of it apart.
        self._lock = threading.Lock()

    def take(
        self,
        buckets: Sequence[tuple[str, float, int]],
        now: float | None = None,
        *,
        block: bool = True,
        spend: bool = True,
    ) -> list[float] | None:
        """Spend one request from each ``(key, rate a second, burst)`` bucket, all or none.

        Returns the seconds each bucket wants the caller to wait: all 0.0 when the request
        may go (and then each bucket was spent), else nothing was spent. With ``block=False``
        it returns None at once when another worker holds the table. With ``spend=False`` it
        only asks (for limits counting outcomes known later, such as failed logins)."""
        located = [(_locate(key, self.groups), rate, burst) for key, rate, burst in buckets]
        if not self._acquire(block):
            return None
        try:
            return self._spend(located, time.monotonic() if now is None else now, spend)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._size)
            self._lock.release()

    def _acquire(self, block: bool) -> bool:
        if not self._lock.acquire(blocking=block):
            return False
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._size)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another worker holds it
            self._lock.release()
            return False
        return True

    def _spend(
        self, located: list[tuple[tuple[int, int], float, int]], at: float, spend: bool
    ) -> list[float]:
        """The GCRA step for each bucket, under the lock; writes only if all may go."""
        waits, updates = [], []
        for (fingerprint, offset), rate, burst in located:
            values = _GROUP.unpack_from(self._map, offset)
            slot = _own_slot(values, fingerprint)
            tat = at if slot is None else values[2 * slot + 1]
            if tat < at or tat - at > self.horizon:  # full again, or from an earlier boot
                tat = at
            interval = 1.0 / rate
            waits.append(max(tat - at - (burst - 1) * interval, 0.0))
            updates.append((fingerprint, offset, slot, values, tat + interval))
        if any(waits) or not spend:
            return waits
        written: list[int] = []
        for fingerprint, offset, slot, values, tat in updates:
            if offset in written:  # two keys of one request in one group: look again
                values = _GROUP.unpack_from(self._map, offset)
                slot = _own_slot(values, fingerprint)
            if slot is None:
                slot = _vacancy(values, at, self.horizon)
            _SLOT.pack_into(self._map, offset + slot * _SLOT.size, fingerprint, tat)
            written.append(offset)
        return waits

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


@functools.lru_cache(maxsize=4096)
def _locate(key: str, groups: int) -> tuple[int, int]:
    """A key's fingerprint (never 0) and the byte offset of its group."""
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    fingerprint = int.from_bytes(digest[:8], "little") | 1
    return fingerprint, int.from_bytes(digest[8:], "little") % groups * _GROUP.size


def _own_slot(values: tuple[float, ...], fingerprint: int) -> int | None:
    try:
        return values[0::2].index(fingerprint)
    except ValueError:
        return None


def _vacancy(values: tuple[float, ...], now: float, horizon: float) -> int:
    """The slot for a new key in a group: a free one (empty, idle or stale), else the one
    whose bucket is closest to full."""
    victim, victim_tat = 0, float("inf")
    for slot in range(SLOTS_PER_GROUP):
        owner, tat = values[2 * slot], values[2 * slot + 1]
        if owner == 0 or tat <= now or tat - now > horizon:
            return slot
        if tat < victim_tat:
            victim, victim_tat = slot, tat
    return victim
