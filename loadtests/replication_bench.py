"""Replication: cargohold copying N images to a second cargohold, against ``skopeo sync`` doing the same copy.

A source cargohold is filled once with N images (default 200) over R repositories: a few base
layers shared by every image plus one or two layers of its own per image, a few MiB each.
Each measurement copies all of it to a fresh, empty cargohold behind a byte-counting TCP
proxy, in one of three ways, rotated between repetitions:

- ``run``: ``cargohold replicate run RULE`` on the source's data directory (reconcile: compare
  every tag, queue a job per difference, then copy with the configured worker pool);
- ``push``: the source server restarted with a push rule, whose jobs come from the event log
  (every push event since the beginning), copied by the server's own replication worker;
- ``skopeo``: ``skopeo sync --src yaml --dest docker`` listing every repository of the source.

Timed: from the start (of the process, or of the source server in ``push`` mode) to the end
of the copy (the process exiting, or the rule's status showing nothing pending). Every tag
is then checked by digest on the target; a copy with a missing or wrong tag is an error,
not a number. Bytes: what went through the proxy to the target, and the request-body
bytes the target counted on its blob-upload routes (its /metrics), compared with the
distinct blob content: equal means no blob byte was sent twice. Run from the repository root:

    python -m loadtests.replication_bench --quick             # 40 images, 2 reps, ~1 minute
    python -m loadtests.replication_bench --json repl.json    # 200 images, 3 reps, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # also runnable as `python loadtests/replication_bench.py`
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from loadtests import oci  # noqa: E402
from loadtests.bench import format_table, wait_for_idle  # noqa: E402
from loadtests.gc_bench import Results, cargohold_registry, tree_cpu  # noqa: E402
from loadtests.harness import MIB, load_at_start, log, work_directory, write_result  # noqa: E402
from loadtests.rss import PeakMemory  # noqa: E402
from tests.replication.support import ADMIN_TOKEN, CountingProxy  # noqa: E402
from tests.support.servers import RegistryProcess, cargohold_command  # noqa: E402

MODES = {"run": "cargohold run", "push": "cargohold push", "skopeo": "skopeo sync"}
QUICK = {"images": 40, "repos": 4, "reps": 2}


@dataclass
class Config:
    images: int = 200
    repos: int = 10
    base_mib: tuple[float, ...] = (8.0, 6.0, 4.0, 2.0)
    unique_layers: tuple[int, int] = (1, 2)
    unique_mib: tuple[float, float] = (1.0, 4.0)
    reps: int = 3
    modes: tuple[str, ...] = tuple(MODES)
    workers: int | None = None  # replication.workers / the target's concurrency; None: the defaults
    proxy: bool = True
    seed: int = 5
    time_cap: float = 900.0
    server_env: dict[str, str] = field(default_factory=dict)
    work_dir: Path = Path(".")


@dataclass(frozen=True)
class Content:
    """What the source holds: every tag with its manifest digest, and the distinct blob bytes."""

    tags: list[tuple[str, str, str]]  # repository, tag, manifest digest
    blobs: int
    blob_bytes: int
    base_bytes: int
    manifest_bytes: int

    @property
    def repositories(self) -> list[str]:
        return sorted({repo for repo, _, _ in self.tags})


# --------------------------------------------------------------------------- the source
def fill(cfg: Config, data_dir: Path) -> Content:
    """Write the images into ``data_dir`` through the engine (the code the HTTP API calls).

    The base layers go in once and are mounted into each repository (global dedup), so the
    fill hashes each distinct byte once; an image's own layers and config are fresh random bytes.
    """
    from tests.engine.conftest import push_blob

    rng = random.Random(cfg.seed)
    repos = [f"bench/app{n:02d}" for n in range(cfg.repos)]
    base = [rng.randbytes(int(mib * MIB)) for mib in cfg.base_mib]
    plans = [
        (
            repos[n % len(repos)],
            f"v{n // len(repos)}",
            [int(rng.uniform(*cfg.unique_mib) * MIB) for _ in range(rng.randint(*cfg.unique_layers))],
        )
        for n in range(cfg.images)
    ]
    registry = cargohold_registry(data_dir)
    base_digests = [push_blob(registry, repos[0], layer) for layer in base]
    del base

    def one(plan: tuple[str, str, list[int]]) -> tuple[str, str, str, int, int]:
        repo, tag, sizes = plan
        for digest in base_digests:
            registry.mount_blob(repo, digest, None)
        layers = [os.urandom(size) for size in sizes]
        diff_ids = [*base_digests, *(push_blob(registry, repo, layer) for layer in layers)]
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        ).encode()
        push_blob(registry, repo, config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256_digest(config), "size": len(config)},
            "layers": [
                {"mediaType": oci.OCI_LAYER, "digest": digest, "size": size}
                for digest, size in zip(
                    diff_ids, [int(mib * MIB) for mib in cfg.base_mib] + sizes, strict=True
                )
            ],
        }
        data = json.dumps(manifest).encode()
        digest = registry.put_manifest(repo, tag, data, oci.OCI_MANIFEST).digest
        return repo, tag, digest, sum(sizes) + len(config), len(data)

    try:
        with ThreadPoolExecutor(4) as pool:
            done = list(pool.map(one, plans))
    finally:
        registry.store.close()
    base_bytes = sum(int(mib * MIB) for mib in cfg.base_mib)
    return Content(
        tags=[(repo, tag, digest) for repo, tag, digest, _, _ in done],
        blobs=len(base_digests) + sum(len(sizes) + 1 for _, _, sizes in plans),
        blob_bytes=base_bytes + sum(own for *_, own, _ in done),
        base_bytes=base_bytes,
        manifest_bytes=sum(size for *_, size in done),
    )


# --------------------------------------------------------------------------- one measurement
@dataclass
class Sample:
    """One copy: wall time and what the target and the proxy saw."""

    copy: Copy
    wire_sent: int
    wire_received: int
    received: dict[str, float]  # request-body bytes by route, from the target's /metrics
    requests: float
    target_cpu: float


def target_metrics(url: str) -> tuple[dict[str, float], float]:
    """Request-body bytes by route and the request count, summed over the target's workers."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    received: dict[str, float] = {}
    requests = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cargohold_http_received_bytes_total":
                route = sample.labels["route"]
                received[route] = received.get(route, 0.0) + sample.value
            elif sample.name == "cargohold_http_requests_total" and sample.labels["route"] != "operations":
                requests += sample.value
    return received, requests


def check_copied(url: str, content: Content) -> None:
    """Every tag is on the target and names the source's digest."""
    wrong = []
    with httpx.Client(base_url=url, timeout=30, headers={"Accept": oci.MANIFEST_ACCEPT}) as client:
        for repo, tag, digest in content.tags:
            response = client.head(f"/v2/{repo}/manifests/{tag}")
            found = response.headers.get("docker-content-digest") if response.status_code == 200 else None
            if found != digest:
                wrong.append(f"{repo}:{tag} is {found or response.status_code}, not {digest}")
    if wrong:
        raise RuntimeError(f"{len(wrong)} of {len(content.tags)} tags wrong on the target: {wrong[:3]}")


def replication_config(path: Path, cfg: Config, target_url: str, rule: str) -> Path:
    """A replication section with one push rule over every bench repository (a fresh target name
    each time, so what an earlier run remembers about where blobs went does not apply)."""
    target: dict[str, Any] = {"name": f"to-{rule}", "url": target_url}
    replication: dict[str, Any] = {"targets": [target], "rules": [{"name": rule, "target": target["name"]}]}
    replication["rules"][0]["repositories"] = ["bench/**"]
    if cfg.workers is not None:
        replication["workers"] = target["concurrency"] = cfg.workers
    path.write_text(yaml.safe_dump({"admin": {"token": ADMIN_TOKEN}, "replication": replication}))
    return path


@dataclass(frozen=True)
class Copy:
    """How one copier ran: wall and CPU seconds, peak RSS of its process tree."""

    seconds: float
    cpu: float
    rss: int
    startup: float | None = None  # push mode: the source server's restart, included in seconds


def run_process(cmd: list[str], env: dict[str, str], log_path: Path, cap: float) -> Copy:
    """Run a copier to its end. A failure raises."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        with PeakMemory(proc.pid, interval=0.1) as memory:
            try:
                code = proc.wait(cap)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{cmd[0]} did not finish in {cap:.0f}s") from None
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {code}: {log_path.read_text()[-600:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return Copy(seconds, cpu, memory.peak_rss)


def copy_with_cli(cfg: Config, source: RegistryProcess, target_url: str, n: int) -> Copy:
    config = replication_config(cfg.work_dir / f"run-{n}.yaml", cfg, target_url, f"run-{n}")
    env = {**os.environ, **cfg.server_env, "CARGOHOLD_CONFIG": str(config)}
    env["CARGOHOLD_DATA_DIR"] = str(source.data_dir)
    cmd = [*cargohold_command(), "replicate", "run", f"run-{n}"]
    return run_process(cmd, env, cfg.work_dir / f"run-{n}.log", cfg.time_cap)


def copy_with_skopeo(
    cfg: Config, source: RegistryProcess, target_host: str, content: Content, n: int
) -> Copy:
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise RuntimeError("skopeo is not installed (apt-get install skopeo)")
    listing = {source.host: {"tls-verify": False, "images": {repo: [] for repo in content.repositories}}}
    src = cfg.work_dir / f"skopeo-{n}.yaml"
    src.write_text(yaml.safe_dump(listing))
    policy = cfg.work_dir / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    # Not --scoped: skopeo names each copy DEST/<last path component>, so DEST is target/bench.
    cmd = [skopeo, "--policy", str(policy), "sync", "--src", "yaml", "--dest", "docker"]
    cmd += ["--dest-tls-verify=false", "--preserve-digests", "--retry-times", "0", str(src)]
    cmd.append(f"{target_host}/bench")
    return run_process(cmd, dict(os.environ), cfg.work_dir / f"skopeo-{n}.log", cfg.time_cap)


def caught_up(url: str, rule: str) -> bool:
    response = httpx.get(
        f"{url}/admin/replication/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )
    state = {r["rule"]: r for r in response.json()["rules"]}.get(rule)
    if not state:
        return False
    if state["jobs"]["dead"]:
        raise RuntimeError(f"{state['jobs']['dead']} dead jobs: {state['last_error']}")
    return state["jobs"]["pending"] == state["jobs"]["running"] == 0 and state["lag_seconds"] == 0


def copy_with_push_rule(cfg: Config, source: RegistryProcess, target_url: str, n: int) -> Copy:
    """Restart the source with a new push rule: its cursor starts at the first event, so every
    image pushed is a job for the server's replication worker. Timed from the restart."""
    rule = f"push-{n}"
    config = replication_config(cfg.work_dir / f"push-{n}.yaml", cfg, target_url, rule)
    source.stop()
    source.env = {**cfg.server_env, "CARGOHOLD_CONFIG": str(config)}
    start = time.perf_counter()
    source.proc = None
    source.start()
    startup = time.perf_counter() - start
    assert source.proc is not None
    deadline = start + cfg.time_cap
    with PeakMemory(source.proc.pid, interval=0.1) as memory:
        while not caught_up(source.url, rule):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the push rule did not catch up in {cfg.time_cap:.0f}s")
            time.sleep(0.1)
    seconds = time.perf_counter() - start
    cpu = tree_cpu(source.proc.pid)
    # Back to a source without replication, as the other modes find it (untimed).
    source.stop()
    source.env = dict(cfg.server_env)
    source.proc = None
    source.start()
    return Copy(seconds, cpu, memory.peak_rss, startup)


def measure(cfg: Config, mode: str, source: RegistryProcess, content: Content, n: int) -> Sample:
    """One copy of everything into a fresh target (removed afterwards)."""
    os.sync()  # the previous copy's dirty pages are not this one's to write back
    target_dir = cfg.work_dir / f"target-{n}"
    with RegistryProcess(data_dir=target_dir, env=dict(cfg.server_env)) as target:
        proxy = CountingProxy(target.port) if cfg.proxy else None
        host = f"127.0.0.1:{proxy.port}" if proxy else target.host
        try:
            if mode == "run":
                copy = copy_with_cli(cfg, source, f"http://{host}", n)
            elif mode == "push":
                copy = copy_with_push_rule(cfg, source, f"http://{host}", n)
            else:
                copy = copy_with_skopeo(cfg, source, host, content, n)
            check_copied(target.url, content)
            received, requests = target_metrics(target.url)
            assert target.proc is not None
            target_cpu = tree_cpu(target.proc.pid)
        finally:
            if proxy is not None:
                proxy.close()
    shutil.rmtree(target_dir, ignore_errors=True)
    return Sample(
        copy=copy,
        wire_sent=proxy.sent if proxy else 0,
        wire_received=proxy.received if proxy else 0,
        received=received,
        requests=requests,
        target_cpu=target_cpu,
    )


# --------------------------------------------------------------------------- the run
WALL = "wall time, start to every tag there"


def record_sample(res: Results, label: str, sample: Sample, content: Content) -> None:
    blob = sample.received.get("blob_upload", 0.0)
    res.record(WALL, "s", label, sample.copy.seconds)
    if sample.copy.startup is not None:
        res.record("of which the source server's restart", "s", label, sample.copy.startup)
    res.record("unique content / wall time", "MB/s", label, content.blob_bytes / sample.copy.seconds / 1e6)
    if sample.wire_sent:
        res.record("bytes sent to the target (wire)", "MiB", label, sample.wire_sent / MIB)
        res.record("bytes the target sent back (wire)", "MiB", label, sample.wire_received / MIB)
    res.record("blob upload bodies received", "MiB", label, blob / MIB)
    res.record("blob bytes sent twice (uploads - unique)", "bytes", label, blob - content.blob_bytes)
    res.record("manifest bodies received", "KiB", label, sample.received.get("manifest", 0.0) / 1024)
    res.record("requests to the target", "count", label, sample.requests)
    res.record("copier CPU", "s", label, sample.copy.cpu)
    res.record("target server CPU", "s", label, sample.target_cpu)
    res.record("copier peak RSS (process tree)", "MiB", label, sample.copy.rss / MIB, aggregate="max")


def verdicts(res: Results, content: Content, labels: list[str]) -> tuple[list[str], dict[str, Any]]:
    lines: list[str] = []
    facts: dict[str, Any] = {}
    wall = res.rows.get(WALL)
    skopeo = wall.value(MODES["skopeo"]) if wall else None
    twice = res.rows.get("blob bytes sent twice (uploads - unique)")
    for label in labels:
        if label == MODES["skopeo"] or wall is None or wall.value(label) is None:
            continue
        if skopeo:
            speedup = skopeo / wall.value(label)  # type: ignore[operator]
            facts[f"{label}: skopeo/cargohold wall time"] = round(speedup, 2)
            verdict = "MET" if speedup > 1 else "NOT MET"
            lines.append(f"{label} vs skopeo sync: {speedup:.2f}x as fast (goal > 1x): {verdict}")
        extra = twice.samples.get(label, []) if twice else []
        if extra:
            worst = max(extra)
            facts[f"{label}: max blob bytes sent twice"] = worst
            verdict = "MET" if worst <= 0 else "NOT MET"
            lines.append(f"{label}: at most {worst:,.0f} blob bytes sent twice (goal 0): {verdict}")
    return lines, facts


def run(cfg: Config) -> dict[str, Any]:
    started = time.monotonic()
    load_before, warning = load_at_start()
    source_dir = cfg.work_dir / "source"
    log(f"filling the source: {cfg.images} images in {cfg.repos} repositories")
    fill_start = time.monotonic()
    content = fill(cfg, source_dir)
    log(
        f"  {content.blobs} distinct blobs, {content.blob_bytes / MIB:.1f} MiB "
        f"({content.base_bytes / MIB:.0f} MiB shared base), {time.monotonic() - fill_start:.0f}s"
    )
    res = Results()
    labels = [MODES[mode] for mode in cfg.modes]
    with RegistryProcess(data_dir=source_dir, env=dict(cfg.server_env)) as source:
        n = 0
        for rep in range(cfg.reps):
            order = cfg.modes[rep % len(cfg.modes) :] + cfg.modes[: rep % len(cfg.modes)]
            log(f"== rep {rep + 1}/{cfg.reps}: {', '.join(order)}")
            for mode in order:
                n += 1
                label = MODES[mode]
                try:
                    sample = measure(cfg, mode, source, content, n)
                except Exception as exc:
                    res.note(WALL, "s", label, f"error: {type(exc).__name__}: {exc}"[:400])
                    log(f"  {label}: {exc}")
                    continue
                record_sample(res, label, sample, content)
    rows = [row for row in res.rows.values() if row.samples or row.notes]
    elapsed = time.monotonic() - started
    print(format_table(rows, labels))
    print()
    lines, facts = verdicts(res, content, labels)
    for line in lines:
        print(line)
    print(
        f"content: {cfg.images} images in {cfg.repos} repositories, {content.blobs} distinct blobs, "
        f"{content.blob_bytes / MIB:.1f} MiB unique ({content.base_bytes / MIB:.0f} MiB of base layers "
        f"shared by every image), {content.manifest_bytes / 1024:.0f} KiB of manifests; medians of "
        f"{cfg.reps} reps (rotating order); proxy {'on' if cfg.proxy else 'off'}; runtime {elapsed:.0f}s"
    )
    if warning:
        print(f"WARNING: {warning}")
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
        "content": {
            "images": len(content.tags),
            "repositories": len(content.repositories),
            "blobs": content.blobs,
            "blob_bytes": content.blob_bytes,
            "base_bytes": content.base_bytes,
            "manifest_bytes": content.manifest_bytes,
        },
        "runtime_s": round(elapsed, 1),
        "load_average_before": load_before,
        "rows": [row.as_dict(labels) for row in rows],
        "verdicts": lines,
        "facts": facts,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadtests.replication_bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
    )
    p.add_argument("--images", type=int, help="images to copy (default 200)")
    p.add_argument("--repos", type=int, help="repositories they are spread over (default 10)")
    p.add_argument("--base-mib", default="8,6,4,2", help="sizes of the base layers every image shares")
    p.add_argument("--unique-layers", default="1-2", help="own layers per image, LOW-HIGH")
    p.add_argument("--unique-mib", default="1-4", help="own layer size range in MiB, LOW-HIGH")
    p.add_argument("--reps", type=int, help="repetitions of each mode (default 3)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--workers", type=int, help="cargohold replication workers and target concurrency")
    p.add_argument("--no-proxy", action="store_true", help="no counting proxy (bytes from /metrics only)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--time-cap", type=float, default=900.0, help="upper bound in seconds for one copy")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE", help="env for cargohold")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S", help="wait up to S s for load < 0.5")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def _pair(text: str, kind: Callable[[str], Any]) -> tuple[Any, Any]:
    low, _, high = text.partition("-")
    return kind(low), kind(high or low)


def build_config(args: argparse.Namespace, work_dir: Path) -> Config:
    def pick(name: str, default: int) -> int:
        given = getattr(args, name)
        return int(given if given is not None else QUICK[name] if args.quick else default)

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {list(MODES)}")
    return Config(
        images=pick("images", 200),
        repos=pick("repos", 10),
        base_mib=tuple(float(x) for x in args.base_mib.split(",") if x.strip()),
        unique_layers=_pair(args.unique_layers, int),
        unique_mib=_pair(args.unique_mib, float),
        reps=pick("reps", 3),
        modes=modes,
        workers=args.workers,
        proxy=not args.no_proxy,
        seed=args.seed,
        time_cap=args.time_cap,
        server_env=dict(item.split("=", 1) for item in args.server_env),
        work_dir=work_dir,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with work_directory("cargohold-replbench-") as work_dir:
        cfg = build_config(args, work_dir)
        wait_for_idle(args.wait_idle)
        result = run(cfg)
    write_result(args.json, result)
    failed = any(
        "error" in text for row in result["rows"] for texts in row["notes"].values() for text in texts
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
