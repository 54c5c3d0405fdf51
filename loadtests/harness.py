"""Run settings, the servers under test, and the bookkeeping for interleaved repetitions.

Both servers run for the whole benchmark and every repetition measures them back to back,
alternating which goes first, so slow drifts of the machine (page cache, dirty writeback,
a noisy neighbour) land on both sides instead of on whichever happened to run second.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from tests.support.servers import RegistryProcess

T = TypeVar("T")
MIB = 1 << 20


@dataclass
class Config:
    """Everything a run is parameterised by; sizes are in bytes, durations in seconds."""

    targets: list[str]
    scenarios: list[str]
    reps: int = 3
    blob_size: int = 512 * MIB
    chunk_size: int = 16 * MIB
    images: int = 256
    clients: int = 32
    layer_size: int = 16 * 1024
    connections: int = 64
    duration: float = 10.0
    wrk_threads: int = 1
    tags: int = 10_000
    tag_connections: int = 8
    tag_fill_clients: int = 16
    time_cap: float = 300.0
    server_env: dict[str, str] = field(default_factory=dict)
    work_dir: Path = Path(".")


@dataclass
class Target:
    """One running registry, labelled for the table (``distribution#2`` when a kind repeats)."""

    label: str
    server: RegistryProcess

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=10.0))


@dataclass
class Row:
    """One line of the result table: samples per target, combined by median (or max for peaks)."""

    name: str
    unit: str
    aggregate: str = "median"
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def value(self, label: str) -> float | None:
        values = self.samples.get(label)
        if not values:
            return None
        return max(values) if self.aggregate == "max" else statistics.median(values)

    def as_dict(self, labels: list[str]) -> dict[str, object]:
        """The row as the benchmarks' ``--json`` output writes it."""
        return {
            "scenario": self.name,
            "unit": self.unit,
            "aggregate": self.aggregate,
            "values": {label: self.value(label) for label in labels},
            "samples": self.samples,
            "notes": self.notes,
        }

    def spread(self, label: str) -> float | None:
        """Half the min-max range relative to the median: a cheap noise gauge for the ratio."""
        values = self.samples.get(label) or []
        middle = self.value(label)
        if self.aggregate == "max" or len(values) < 2 or not middle:
            return None
        return (max(values) - min(values)) / 2 / middle


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_at_start(threshold: float = 0.5) -> tuple[float, str | None]:
    """The 1-minute load average, and a warning when it is high: on a 2-core machine other
    work skews every number, so a run says so rather than hide it."""
    load = os.getloadavg()[0]
    warning = f"the 1-minute load average was {load:.1f} at the start" if load > threshold else None
    if warning:
        log(f"WARNING: {warning}; results will be noisy")
    return load, warning


class Bench:
    """Holds the targets and the rows being filled in; scenarios call ``measure`` and ``record``."""

    def __init__(self, config: Config, targets: list[Target]) -> None:
        self.config = config
        self.targets = targets
        self.rows: dict[str, Row] = {}
        self.cache: dict[str, object] = {}  # untimed setup shared between scenarios

    def order(self, rep: int) -> list[Target]:
        """A/B on even repetitions, B/A on odd ones."""
        return self.targets if rep % 2 == 0 else self.targets[::-1]

    def row(self, name: str, unit: str, aggregate: str = "median") -> Row:
        return self.rows.setdefault(name, Row(name, unit, aggregate))

    def record(self, name: str, unit: str, target: Target, value: float, aggregate: str = "median") -> None:
        self.row(name, unit, aggregate).samples.setdefault(target.label, []).append(value)
        log(f"  {name:<44} {target.label:<16} {value:12.1f} {unit}")

    def note(self, name: str, unit: str, target: Target, text: str) -> None:
        notes = self.row(name, unit).notes.setdefault(target.label, [])
        if text not in notes:
            notes.append(text)
        log(f"  {name:<44} {target.label:<16} NOTE {text}")

    def measure(self, name: str, unit: str, target: Target, fn: Callable[[], T]) -> tuple[T, float] | None:
        """Run ``fn`` and time it; a failure becomes a note on the row instead of ending the run."""
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:
            self.note(name, unit, target, f"error: {type(exc).__name__}: {exc}"[:300])
            return None
        return result, time.perf_counter() - start


@contextlib.contextmanager
def work_directory(prefix: str) -> Iterator[Path]:
    """A scratch directory for one benchmark run, removed afterwards whatever happens."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_result(path: Path | None, result: object) -> None:
    """The ``--json`` output, if asked for."""
    if path is not None:
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"wrote {path}")
