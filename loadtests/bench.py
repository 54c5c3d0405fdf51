"""Benchmark cargohold against CNCF Distribution over the OCI distribution HTTP API.

Both registries run on loopback with private data directories for the whole run, and each
repetition measures them back to back in alternating order; the table reports medians
(peaks for RSS). Run from the repository root:

    python -m loadtests.bench --quick                       # smoke run, ~1 minute
    python -m loadtests.bench --json out.json               # full run, ~6 minutes
    python -m loadtests.bench --compare distribution,distribution   # check the harness itself
    python -m loadtests.bench --memory-check                # 2 GiB push+pull, peak RSS vs limit
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # also runnable as `python loadtests/bench.py`
    sys.path.insert(0, str(ROOT))

from loadtests import loadgen, oci  # noqa: E402
from loadtests.harness import (  # noqa: E402
    MIB,
    Bench,
    Config,
    Row,
    Target,
    load_at_start,
    log,
    work_directory,
    write_result,
)
from loadtests.rss import PeakMemory, tree_memory  # noqa: E402
from loadtests.scenarios import BIG_REPO, SCENARIOS  # noqa: E402
from tests.support.servers import RegistryProcess  # noqa: E402

KINDS = ("cargohold", "distribution")
QUICK = {"reps": 2, "blob_mib": 64, "images": 64, "duration": 3.0, "tags": 1000}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadtests.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", default="cargohold,distribution", help="targets A,B (ratio is A/B)")
    p.add_argument("--only", choices=KINDS, help="benchmark a single server kind")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument(
        "--quick",
        action="store_true",
        help="short smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    p.add_argument("--reps", type=int, help="repetitions per scenario (default 3)")
    p.add_argument("--blob-mib", type=int, help="large blob size in MiB (default 512)")
    p.add_argument("--chunk-mib", type=int, default=16, help="PATCH chunk size in MiB")
    p.add_argument("--images", type=int, help="small images per measurement (default 256)")
    p.add_argument("--clients", type=int, default=32, help="concurrent small-image pushers")
    p.add_argument("--layer-kib", type=int, default=16, help="small-image layer size in KiB")
    p.add_argument("--connections", type=int, default=64, help="connections for manifest GET / blob HEAD")
    p.add_argument("--duration", type=float, help="seconds per request-rate measurement (default 10)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (1 leaves the servers more CPU)")
    p.add_argument("--tags", type=int, help="tags in the tags-list repository (default 10000)")
    p.add_argument("--tag-connections", type=int, default=8, help="connections for the tags list")
    p.add_argument("--time-cap", type=float, default=300.0, help="upper bound in seconds for any client loop")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE", help="env for cargohold")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S", help="wait up to S s for load < 0.5")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--memory-check", action="store_true", help="push+pull one big blob, check peak RSS")
    p.add_argument("--memory-blob-mib", type=int, default=2048, help="blob size for --memory-check")
    p.add_argument("--rss-limit-mib", type=float, default=150.0, help="peak RSS limit for --memory-check")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, work_dir: Path) -> Config:
    def pick(name: str, default: float) -> float:
        given = getattr(args, name)
        return given if given is not None else QUICK[name] if args.quick else default

    targets = [args.only] if args.only else [t.strip() for t in args.compare.split(",") if t.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for name in targets:
        if name not in KINDS:
            raise SystemExit(f"unknown target {name!r}; choose from {KINDS}")
    for name in scenarios:
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; choose from {list(SCENARIOS)}")
    return Config(
        targets=targets,
        scenarios=scenarios,
        reps=int(pick("reps", 3)),
        blob_size=int(pick("blob_mib", 512)) * MIB,
        chunk_size=args.chunk_mib * MIB,
        images=int(pick("images", 256)),
        clients=args.clients,
        layer_size=args.layer_kib * 1024,
        connections=args.connections,
        duration=pick("duration", 10.0),
        wrk_threads=args.wrk_threads,
        tags=int(pick("tags", 10_000)),
        tag_connections=args.tag_connections,
        time_cap=args.time_cap,
        server_env=dict(item.split("=", 1) for item in args.server_env),
        work_dir=work_dir,
    )


def start_targets(stack: ExitStack, config: Config) -> list[Target]:
    """Start every target; a kind that appears twice gets its own server and a ``#2`` label."""
    targets = []
    for i, kind in enumerate(config.targets):
        label = kind if config.targets.count(kind) == 1 else f"{kind}#{config.targets[:i].count(kind) + 1}"
        env = config.server_env if kind == "cargohold" else {}
        server = stack.enter_context(RegistryProcess(kind=kind, env=env))
        log(f"started {label} at {server.url} (pid {server.proc.pid if server.proc else '?'})")
        targets.append(Target(label, server))
    return targets


def format_table(rows: list[Row], labels: list[str]) -> str:
    """Plain-text table; the ratio column compares the first two targets."""

    def fmt(row: Row, label: str) -> str:
        value, spread = row.value(label), row.spread(label)
        if value is None:
            return "-"
        return f"{value:,.1f}" + (f" ±{spread:.0%}" if spread is not None else "")

    header = ["scenario", "unit", *labels]
    if len(labels) == 2:
        header.append(f"ratio {labels[0]}/{labels[1]}")
    lines = [header]
    for row in rows:
        values = [row.value(label) for label in labels]
        line = [row.name, row.unit, *(fmt(row, label) for label in labels)]
        if len(labels) == 2:
            a, b = values
            line.append(f"{a / b:.2f}" if a is not None and b else "-")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append(" | ".join(cells))
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    notes = [
        f"  {row.name} [{label}]: {text}"
        for row in rows
        for label, texts in row.notes.items()
        for text in texts
    ]
    return "\n".join(out + (["", "notes:", *notes] if notes else []))


def wait_for_idle(limit_s: float, threshold: float = 0.5) -> None:
    """On a shared 2-core machine, give someone else's test run a bounded chance to finish first."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] > threshold and time.monotonic() < deadline:
        log(f"waiting for the machine to go idle (load {os.getloadavg()[0]:.1f})")
        time.sleep(min(15.0, max(0.0, deadline - time.monotonic())))


def run_benchmark(config: Config) -> dict[str, object]:
    started = time.monotonic()
    load_before, warning = load_at_start()
    with ExitStack() as stack:
        bench = Bench(config, start_targets(stack, config))
        for name in config.scenarios:
            log(f"== {name}")
            SCENARIOS[name](bench)
        labels = [t.label for t in bench.targets]
    rows = [row for row in bench.rows.values() if row.samples or row.notes]
    elapsed = time.monotonic() - started
    print(format_table(rows, labels))
    tools = f"GET {loadgen.generator_name('GET')}, HEAD {loadgen.generator_name('HEAD')}"
    print(
        f"\nload generators: {tools}; medians of {config.reps} interleaved reps; "
        f"RSS/PSS rows are peaks over reps of the server process tree; "
        f"±: half the min-max range; runtime {elapsed:.0f}s"
    )
    if warning:
        print(f"WARNING: {warning}")
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(config).items()},
        "load_generator": {m: loadgen.generator_name(m) for m in ("GET", "HEAD")},
        "runtime_s": round(elapsed, 1),
        "load_average_before": load_before,
        "rows": [row.as_dict(labels) for row in rows],
    }


def memory_check(config: Config, blob_size: int, limit_mib: float) -> tuple[dict[str, object], bool]:
    """Push (monolithic, then chunked) and pull a large blob; compare each phase's peak tree RSS to the limit.

    This is the "2 GiB blob with RSS under 150 MiB" check. Streaming code stays near its idle
    footprint; code that buffers a body grows by the body's size. cargohold runs one worker
    here unless ``--server-env CARGOHOLD_WORKERS=N`` says otherwise, as in
    tests/stress/test_memory.py: each extra worker adds its own ~45 MiB of RSS at idle.
    """
    kind = config.targets[0]
    env = {"CARGOHOLD_WORKERS": "1", **config.server_env} if kind == "cargohold" else {}
    phases: dict[str, dict[str, float]] = {}
    blob_path = config.work_dir / "mem.bin"
    with RegistryProcess(kind=kind, env=env) as server:
        target = Target(kind, server)
        idle = tree_memory(target.pid)
        phases["idle"] = {"rss_mib": idle.rss / MIB, "pss_mib": idle.pss / MIB}
        log(f"[memory-check] {kind}: {idle.processes} processes, idle RSS {idle.rss / MIB:.1f} MiB")
        for phase in ("push monolithic", "pull", "push chunked"):
            if phase.startswith("push"):  # each push gets bytes the server has never seen
                log(f"[memory-check] writing a {blob_size // MIB} MiB random blob")
                blob = oci.write_random_blob(blob_path, blob_size)
            log(f"[memory-check] {phase} on {kind}")
            start = time.perf_counter()
            with target.client(timeout=600.0) as client, PeakMemory(target.pid) as memory:
                if phase == "push monolithic":
                    oci.push_monolithic(client, BIG_REPO, blob)
                elif phase == "push chunked":
                    oci.push_chunked(client, BIG_REPO, blob, config.chunk_size)
                else:
                    oci.pull_blob(target.url, BIG_REPO, blob.digest, verify=True)
            rate = blob_size / (time.perf_counter() - start) / 1e6
            phases[phase] = {"rss_mib": memory.peak_rss / MIB, "pss_mib": memory.peak_pss / MIB, "mb_s": rate}
    ok = all(p["rss_mib"] <= limit_mib for p in phases.values())
    print(
        f"{kind} idle: RSS {idle.rss / MIB:.1f} MiB, PSS {idle.pss / MIB:.1f} MiB, {idle.processes} processes"
    )
    for phase, p in phases.items():
        if phase == "idle":
            continue
        verdict = "ok" if p["rss_mib"] <= limit_mib else "OVER"
        client = " (client hashing)" if phase == "pull" else ""
        print(
            f"{kind} {phase}: peak RSS {p['rss_mib']:.1f} MiB {verdict} (limit {limit_mib:g}), "
            f"+{p['rss_mib'] - idle.rss / MIB:.1f} over idle; PSS {p['pss_mib']:.1f} MiB; "
            f"{p['mb_s']:.0f} MB/s{client}"
        )
    print(f"memory check {'PASSED' if ok else 'FAILED'} for a {blob_size / MIB / 1024:g} GiB blob")
    result = {"target": kind, "env": env, "blob_bytes": blob_size, "limit_mib": limit_mib, "phases": phases}
    return {"memory_check": {**result, "ok": ok}}, ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with work_directory("cargohold-bench-") as work_dir:
        config = build_config(args, work_dir)
        wait_for_idle(args.wait_idle)
        if args.memory_check:
            if not args.only:
                config.targets = ["cargohold"]
            result, ok = memory_check(config, args.memory_blob_mib * MIB, args.rss_limit_mib)
        else:
            result, ok = run_benchmark(config), True
    write_result(args.json, result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
