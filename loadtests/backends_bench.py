"""Large-blob push and pull throughput of cargohold on each storage backend, in one run.

cargohold runs four times side by side on loopback: on its filesystem store and on S3
(SeaweedFS), GCS (fake-gcs-server) and Azure (Azurite), the emulators started as the test
suite starts them (``loadtests/emulators.py``). Each repetition pushes fresh random blobs
monolithically and in 16 MiB PATCHes, pulls one back, and times the store's own SDK
putting and getting a file of the same size, so the table shows whether the registry or
the store is the limit; the backends' order rotates between repetitions. Then one large
chunked push to S3 with the server tree's peak RSS and PSS. Run from the repository root:

    python -m loadtests.backends_bench --quick              # 64 MiB blobs, 256 MiB memory push
    python -m loadtests.backends_bench --json backends.json # 256 MiB blobs, 1 GiB memory push
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # also runnable as `python loadtests/backends_bench.py`
    sys.path.insert(0, str(ROOT))

from loadtests import oci  # noqa: E402
from loadtests.bench import format_table, wait_for_idle  # noqa: E402
from loadtests.emulators import Store, start_store  # noqa: E402
from loadtests.harness import MIB, Row, Target, load_at_start, log, work_directory, write_result  # noqa: E402
from loadtests.rss import PeakMemory, tree_memory  # noqa: E402
from tests.support.servers import RegistryProcess  # noqa: E402

BACKENDS = ("filesystem", "s3", "gcs", "azure")
QUICK = {"reps": 2, "blob_mib": 64, "memory_mib": 256}
REPO = "bench/big"


@dataclass
class Config:
    backends: tuple[str, ...] = BACKENDS
    reps: int = 3
    blob_size: int = 256 * MIB
    chunk_size: int = 16 * MIB
    pull_bytes: int = 512 * MIB
    memory_size: int = 1024 * MIB
    memory_backend: str = "s3"
    time_cap: float = 600.0
    server_env: dict[str, str] = field(default_factory=dict)
    work_dir: Path = Path(".")


@dataclass
class Side:
    """One backend: the running cargohold on it, and its store (None for the filesystem)."""

    label: str
    target: Target
    store: Store | None


class Results:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.facts: dict[str, Any] = {}

    def record(self, name: str, unit: str, label: str, value: float, aggregate: str = "median") -> None:
        row = self.rows.setdefault(name, Row(name, unit, aggregate))
        row.samples.setdefault(label, []).append(value)
        log(f"  {name:<50} {label:<11} {value:10.1f} {unit}")

    def note(self, name: str, unit: str, label: str, text: str) -> None:
        notes = self.rows.setdefault(name, Row(name, unit)).notes.setdefault(label, [])
        if text not in notes:
            notes.append(text)
        log(f"  {name:<50} {label:<11} NOTE {text}")


def size_label(size: int) -> str:
    return f"{size / MIB / 1024:g} GiB" if size >= 1024 * MIB else f"{size / MIB:g} MiB"


def start_sides(stack: ExitStack, cfg: Config) -> list[Side]:
    sides = []
    for label in cfg.backends:
        store = None if label == "filesystem" else start_store(stack, label)
        env = {**(store.env if store else {}), **cfg.server_env}
        server = stack.enter_context(RegistryProcess(kind="cargohold", env=env))
        log(f"started cargohold on {label} at {server.url} (pid {server.proc.pid if server.proc else '?'})")
        sides.append(Side(label, Target(label, server), store))
    return sides


# ------------------------------------------------------------------ the store's own speed
def disk_put(src: Path, dst: Path) -> None:
    """The filesystem's reference: copy with fsync, as the filesystem backend writes objects."""
    with open(src, "rb") as inp, open(dst, "wb") as out:
        while chunk := inp.read(4 * MIB):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def disk_get(path: Path) -> int:
    buffer = memoryview(bytearray(4 * MIB))
    total = 0
    with open(path, "rb", buffering=0) as inp:
        while n := inp.readinto(buffer):
            total += n
    return total


def sdk_round(side: Side, blob: oci.BlobFile, rep: int, res: Results, put_name: str, get_name: str) -> None:
    key = f"bench-sdk/{rep}"
    if side.store is None:
        copy = blob.path.with_name(f"disk-{rep}.bin")
        try:
            start = time.perf_counter()
            disk_put(blob.path, copy)
            res.record(put_name, "MB/s", side.label, blob.size / (time.perf_counter() - start) / 1e6)
            start = time.perf_counter()
            got = disk_get(copy)
            res.record(get_name, "MB/s", side.label, got / (time.perf_counter() - start) / 1e6)
        finally:
            copy.unlink(missing_ok=True)
        res.note(put_name, "MB/s", side.label, "local disk: write + fsync, then read (page cache)")
        return
    try:
        start = time.perf_counter()
        side.store.sdk_put(blob.path, key)
        res.record(put_name, "MB/s", side.label, blob.size / (time.perf_counter() - start) / 1e6)
        start = time.perf_counter()
        got = side.store.sdk_get(key)
        seconds = time.perf_counter() - start
        if got != blob.size:
            res.note(get_name, "MB/s", side.label, f"short read: {got} of {blob.size}")
        res.record(get_name, "MB/s", side.label, got / seconds / 1e6)
        res.note(put_name, "MB/s", side.label, side.store.sdk_name)
    except Exception as exc:
        res.note(put_name, "MB/s", side.label, f"error: {type(exc).__name__}: {exc}"[:300])
    finally:
        side.store.sdk_delete(key)


# ------------------------------------------------------------------ one repetition
def measure_side(
    cfg: Config, res: Results, side: Side, mono: oci.BlobFile, chunked: oci.BlobFile, rep: int
) -> None:
    size = size_label(cfg.blob_size)
    names = {
        "mono": f"blob push monolithic, {size}",
        "chunked": f"blob push chunked {cfg.chunk_size // MIB} MiB, {size}",
        "pull": f"blob pull, {size}",
        "put": f"store SDK put, {size}",
        "get": f"store SDK get, {size}",
    }
    target = side.target
    for kind, blob in (("mono", mono), ("chunked", chunked)):
        os.sync()  # no dirty pages from the previous backend's writes
        with target.client(timeout=cfg.time_cap) as client, PeakMemory(target.pid) as memory:
            start = time.perf_counter()
            try:
                if kind == "mono":
                    oci.push_monolithic(client, REPO, blob)
                else:
                    oci.push_chunked(client, REPO, blob, cfg.chunk_size)
            except Exception as exc:
                res.note(names[kind], "MB/s", side.label, f"error: {type(exc).__name__}: {exc}"[:300])
                continue
            seconds = time.perf_counter() - start
        res.record(names[kind], "MB/s", side.label, blob.size / seconds / 1e6)
        res.record(
            f"peak server RSS (tree sum), {kind} push", "MiB", side.label, memory.peak_rss / MIB, "max"
        )
    if rep == 0:  # once, untimed: the bytes come back intact
        try:
            oci.pull_blob(target.url, REPO, mono.digest, verify=True)
        except Exception as exc:
            res.note(names["pull"], "MB/s", side.label, f"verify failed: {type(exc).__name__}: {exc}"[:300])
    rounds = max(1, min(8, cfg.pull_bytes // cfg.blob_size))
    with PeakMemory(target.pid) as memory:
        start = time.perf_counter()
        try:
            received = sum(oci.pull_blob(target.url, REPO, mono.digest) for _ in range(rounds))
        except Exception as exc:
            res.note(names["pull"], "MB/s", side.label, f"error: {type(exc).__name__}: {exc}"[:300])
            received = 0
        seconds = time.perf_counter() - start
    if received:
        if received != rounds * mono.size:
            res.note(names["pull"], "MB/s", side.label, f"short read: {received} of {rounds * mono.size}")
        res.record(names["pull"], "MB/s", side.label, received / seconds / 1e6)
        res.record("peak server RSS (tree sum), pull", "MiB", side.label, memory.peak_rss / MIB, "max")
    sdk_round(side, mono, rep, res, names["put"], names["get"])


def memory_push(cfg: Config, res: Results, side: Side) -> None:
    """One large chunked push with the server tree's peak RSS and PSS (20 ms sampling)."""
    size = size_label(cfg.memory_size)
    name = f"{size} chunked push ({cfg.chunk_size // MIB} MiB PATCHes)"
    log(f"== {name} to {side.label}: writing the blob")
    blob = oci.write_random_blob(cfg.work_dir / "memory.bin", cfg.memory_size)
    try:
        idle = tree_memory(side.target.pid)
        os.sync()
        with side.target.client(timeout=cfg.time_cap) as client, PeakMemory(side.target.pid) as memory:
            start = time.perf_counter()
            oci.push_chunked(client, REPO, blob, cfg.chunk_size)
            seconds = time.perf_counter() - start
    except Exception as exc:
        res.note(f"{name}: throughput", "MB/s", side.label, f"error: {type(exc).__name__}: {exc}"[:300])
        return
    finally:
        blob.path.unlink(missing_ok=True)
    res.record(f"{name}: throughput", "MB/s", side.label, blob.size / seconds / 1e6)
    res.record(f"{name}: server idle RSS before", "MiB", side.label, idle.rss / MIB, "max")
    res.record(f"{name}: peak server RSS (tree sum)", "MiB", side.label, memory.peak_rss / MIB, "max")
    res.record(f"{name}: peak server PSS (tree sum)", "MiB", side.label, memory.peak_pss / MIB, "max")
    res.facts["memory_push"] = {
        "backend": side.label,
        "bytes": blob.size,
        "seconds": round(seconds, 2),
        "processes": idle.processes,
        "idle_rss_mib": round(idle.rss / MIB, 1),
        "idle_pss_mib": round(idle.pss / MIB, 1),
        "peak_rss_mib": round(memory.peak_rss / MIB, 1),
        "peak_pss_mib": round(memory.peak_pss / MIB, 1),
    }


def run(cfg: Config) -> dict[str, Any]:
    started = time.monotonic()
    load_before, warning = load_at_start()
    res = Results()
    with ExitStack() as stack:
        sides = start_sides(stack, cfg)
        res.facts["server_processes"] = {s.label: tree_memory(s.target.pid).processes for s in sides}
        for rep in range(cfg.reps):
            log(f"== rep {rep + 1}/{cfg.reps}: writing two fresh {size_label(cfg.blob_size)} random blobs")
            mono = oci.write_random_blob(cfg.work_dir / "mono.bin", cfg.blob_size)
            chunked = oci.write_random_blob(cfg.work_dir / "chunked.bin", cfg.blob_size)
            try:
                order = sides[rep % len(sides) :] + sides[: rep % len(sides)]
                for side in order:
                    log(f"-- {side.label}")
                    measure_side(cfg, res, side, mono, chunked, rep)
            finally:
                mono.path.unlink(missing_ok=True)
                chunked.path.unlink(missing_ok=True)
        memory_side = next((s for s in sides if s.label == cfg.memory_backend), None)
        if memory_side is not None and cfg.memory_size:
            memory_push(cfg, res, memory_side)
        res.facts["disk_free_gib_before_cleanup"] = round(shutil.disk_usage(cfg.work_dir).free / 2**30, 1)
    labels = list(cfg.backends)
    # Throughput first, then the store's own, then memory (insertion order interleaves them).
    rank = ("blob push mono", "blob push chunked", "blob pull", "store SDK put", "store SDK get", "peak")
    rows = sorted(
        (row for row in res.rows.values() if row.samples or row.notes),
        key=lambda row: next((i for i, p in enumerate(rank) if row.name.startswith(p)), len(rank)),
    )
    elapsed = time.monotonic() - started
    procs = ", ".join(f"{k} {v}" for k, v in res.facts["server_processes"].items()) + " processes"
    print(format_table(rows, labels))
    print(
        f"\nmedians of {cfg.reps} reps (backend order rotated each rep), fresh random blobs per rep; "
        f"pull = {max(1, min(8, cfg.pull_bytes // cfg.blob_size))} GETs of the pushed blob per sample; "
        f"RSS rows are peaks of the cargohold process tree ({procs}); "
        f"emulators and client share the same 2 cores; runtime {elapsed:.0f}s"
    )
    if warning:
        print(f"WARNING: {warning}")
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
        "runtime_s": round(elapsed, 1),
        "load_average_before": load_before,
        "rows": [row.as_dict(labels) for row in rows],
        "facts": res.facts,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadtests.backends_bench", description=__doc__.split("\n\n")[0])
    quick = ", ".join(f"{k}={v}" for k, v in QUICK.items())
    p.add_argument("--quick", action="store_true", help=f"smoke run: {quick}")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--reps", type=int, help="repetitions (default 3)")
    p.add_argument("--blob-mib", type=int, help="blob size in MiB (default 256)")
    p.add_argument("--chunk-mib", type=int, default=16, help="PATCH size in MiB")
    p.add_argument("--pull-mib", type=int, default=512, help="bytes pulled per sample (whole GETs)")
    p.add_argument("--memory-mib", type=int, help="size of the memory-measured push (default 1024; 0: skip)")
    p.add_argument("--memory-backend", default="s3", choices=BACKENDS, help="backend of that push")
    p.add_argument("--time-cap", type=float, default=600.0, help="client timeout in seconds")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE", help="env for cargohold")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S", help="wait up to S s for load < 0.5")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, work_dir: Path) -> Config:
    def pick(name: str, default: int) -> int:
        given = getattr(args, name)
        return int(given if given is not None else QUICK[name] if args.quick else default)

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    for name in backends:
        if name not in BACKENDS:
            raise SystemExit(f"unknown backend {name!r}; choose from {BACKENDS}")
    return Config(
        backends=backends,
        reps=pick("reps", 3),
        blob_size=pick("blob_mib", 256) * MIB,
        chunk_size=args.chunk_mib * MIB,
        pull_bytes=args.pull_mib * MIB,
        memory_size=pick("memory_mib", 1024) * MIB,
        memory_backend=args.memory_backend,
        time_cap=args.time_cap,
        server_env=dict(item.split("=", 1) for item in args.server_env),
        work_dir=work_dir,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with work_directory("cargohold-backends-bench-") as work_dir:
        cfg = build_config(args, work_dir)
        wait_for_idle(args.wait_idle)
        result = run(cfg)
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
