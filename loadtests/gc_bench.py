"""Garbage collection: cargohold's GC against CNCF Distribution's offline GC on the same content.

Both registries get the same N small images (a config and 4 layers each, 64-512 bytes per
blob, so the run is about metadata, not bytes), then lose every other manifest (deleted by
digest: the manifest and its tags go, as Distribution's DELETE does), which leaves half the
blobs unreferenced (``--delete-every 10``: one in ten, a GC that runs often). Timed:
``cargohold gc --grace 0`` against ``docker-registry garbage-collect CONFIG`` (offline, the
registry stopped), each on a fresh (real, not hard-linked) copy of the filled store, in
alternating order. Then small-image pushes/s against a cargohold holding that backlog, with
and without ``cargohold gc`` looping beside it. Run from the repository root:

    python -m loadtests.gc_bench --quick                 # 2,000 manifests, a few minutes
    python -m loadtests.gc_bench --json gc.json          # 20,000 manifests / 100,000 blobs
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # also runnable as `python loadtests/gc_bench.py`
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from loadtests import oci  # noqa: E402
from loadtests.bench import format_table, wait_for_idle  # noqa: E402
from loadtests.harness import Row, load_at_start, log, work_directory, write_result  # noqa: E402
from loadtests.rss import _tree_pids  # noqa: E402
from tests.support.servers import RegistryProcess, cargohold_command  # noqa: E402

CH, DIST = "cargohold", "distribution"
QUICK = {"manifests": 2000, "gc_reps": 2, "images": 128, "push_reps": 2}
V2 = Path("docker/registry/v2")
GC_SUMMARY = re.compile(r"(\d+) blobs marked, (\d+) blobs and (\d+) manifests eligible for deletion")


# --------------------------------------------------------------------------- content
@dataclass(frozen=True)
class Entry:
    """One image of the content: where it goes and whether the benchmark deletes it."""

    index: int
    repo: str
    tag: str
    image: oci.SmallImage
    deleted: bool

    @property
    def blobs(self) -> list[bytes]:
        return [self.image.config, *self.image.layers]


def make_image(rng: random.Random, layers: int, low: int, high: int) -> oci.SmallImage:
    """Like ``oci.SmallImage.random`` but with layer sizes drawn from [low, high] bytes."""
    blobs = [rng.randbytes(rng.randint(low, high)) for _ in range(layers)]
    diff_ids = [oci.sha256_digest(layer) for layer in blobs]
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256_digest(config), "size": len(config)},
        "layers": [
            {"mediaType": oci.OCI_LAYER, "digest": oci.sha256_digest(b), "size": len(b)} for b in blobs
        ],
    }
    return oci.SmallImage(blobs, config, json.dumps(manifest).encode())


def make_content(cfg: Config) -> list[Entry]:
    rng = random.Random(cfg.seed)
    repos = max(1, cfg.manifests // cfg.per_repo)
    return [
        Entry(
            i,
            f"gc/r{i % repos:04d}",
            f"t{i:06d}",
            make_image(rng, cfg.layers, cfg.blob_min, cfg.blob_max),
            deleted=i % cfg.delete_every == cfg.delete_every - 1,
        )
        for i in range(cfg.manifests)
    ]


# --------------------------------------------------------------------------- settings
@dataclass
class Config:
    manifests: int = 20_000
    layers: int = 4
    blob_min: int = 64
    blob_max: int = 512
    per_repo: int = 200
    delete_every: int = 2
    seed: int = 1
    gc_reps: int = 3
    cargohold_fill: str = "engine"
    distribution_fill: str = "auto"
    fill_budget: float = 600.0
    fill_clients: int = 32
    fill_workers: int = 4
    delete_untagged: bool = False
    cold: bool = False  # drop the page cache before each first GC
    images: int = 256
    clients: int = 32
    layer_size: int = 16 * 1024
    push_reps: int = 3
    loop_graces: tuple[str, ...] = ("0", "60s")
    parts: tuple[str, ...] = ("gc", "push")
    time_cap: float = 1200.0
    profile: Path | None = None
    work_dir: Path = Path(".")


# --------------------------------------------------------------------------- helpers
def run_pool(
    items: list[Any], clients: int, cap: float, fn: Callable[[httpx.Client, Any], None], url: str
) -> int:
    """Apply ``fn(client, item)`` from ``clients`` threads, one connection each; bounded by ``cap`` s."""
    counter = itertools.count()
    deadline = time.monotonic() + cap

    def worker(_: int) -> int:
        done = 0
        with httpx.Client(base_url=url, timeout=httpx.Timeout(120.0, connect=10.0)) as client:
            while time.monotonic() < deadline and (i := next(counter)) < len(items):
                fn(client, items[i])
                done += 1
        return done

    with ThreadPoolExecutor(clients) as pool:
        return sum(pool.map(worker, range(clients)))


def push_entry(client: httpx.Client, entry: Entry) -> None:
    entry.image.push(client, entry.repo, entry.tag)


def delete_entry(client: httpx.Client, entry: Entry) -> None:
    oci.expect(client.delete(f"/v2/{entry.repo}/manifests/{entry.image.manifest_digest}"), 202)


def copy_store(src: Path, dst: Path) -> None:
    """``cp -a``: a real copy of every file. Not ``cp -al``: unlinking a hard-linked file only
    drops a name, so a GC on a hard-linked copy never frees an inode or a block. That flattered
    cargohold, whose deletes are all file unlinks, more than Distribution, whose per-blob
    directories were real even then: on the 100,000-blob store, cargohold's GC went 0.85 ->
    2.1 s and Distribution's 10.9 -> 15.0 s once the copies were real (ext4 here)."""
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    for stale in dst.glob("server-*.log"):
        stale.unlink()


def blob_files(storage: Path) -> tuple[int, int]:
    """Count and total size of Distribution's blob data files."""
    count = size = 0
    root = storage / V2 / "blobs" / "sha256"
    if not root.exists():
        return 0, 0
    for prefix in os.scandir(root):
        for blob in os.scandir(prefix.path):
            try:
                size += os.stat(os.path.join(blob.path, "data")).st_size
                count += 1
            except FileNotFoundError:
                pass
    return count, size


def tree_bytes(path: Path) -> int:
    """Disk blocks used under ``path`` (du), so the run can say what it occupies."""
    out = subprocess.run(["du", "-sb", "--apparent-size", str(path)], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout else 0


# --------------------------------------------------------------------------- cargohold side
def cargohold_registry(data_dir: Path):  # type: ignore[no-untyped-def]
    from cargohold.config import Settings
    from cargohold.runtime import open_registry

    return open_registry(Settings(data_dir=data_dir))


def cargohold_fill_engine(data_dir: Path, entries: list[Entry], workers: int) -> None:
    """In-process through the engine: the same upload and manifest code paths as HTTP, no HTTP."""
    from tests.engine.conftest import push_blob

    registry = cargohold_registry(data_dir)

    def one(entry: Entry) -> None:
        for blob in entry.blobs:
            push_blob(registry, entry.repo, blob)
        registry.put_manifest(entry.repo, entry.tag, entry.image.manifest, oci.OCI_MANIFEST)

    try:
        with ThreadPoolExecutor(workers) as pool:
            for n, _ in enumerate(pool.map(one, entries), 1):
                if n % 5000 == 0:
                    log(f"  cargohold engine fill: {n}/{len(entries)}")
    finally:
        registry.store.close()


def cargohold_delete_engine(data_dir: Path, entries: list[Entry]) -> None:
    registry = cargohold_registry(data_dir)
    try:
        for entry in entries:
            registry.delete_manifest(entry.repo, entry.image.manifest_digest)
    finally:
        registry.store.close()


def cargohold_gc(data_dir: Path, grace: str = "0", timeout: float = 1200.0) -> tuple[float, dict[str, Any]]:
    """``cargohold gc --grace G --json`` in a subprocess; returns wall seconds and its report."""
    env = {**os.environ, "CARGOHOLD_DATA_DIR": str(data_dir)}
    cmd = [*cargohold_command(), "gc", "--grace", grace, "--json"]
    start = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"cargohold gc exited {run.returncode}: {run.stderr[-2000:]}")
    return seconds, json.loads(run.stdout)


ADMIN_TOKEN = "gc-bench"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_page_cache() -> None:
    """Write back, then drop the page cache, dentries and inodes (Linux, root): the next GC
    reads its store from the disk, as a daily GC of a store larger than RAM does."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs to write {DROP_CACHES} (Linux, as root): {exc}") from None


def cargohold_gc_in_server(
    data_dir: Path, timeout: float = 1200.0, before: Callable[[], None] = lambda: None
) -> tuple[float, dict[str, Any]]:
    """The same run as a scheduled GC does it: inside ``cargohold serve`` (started first, not
    timed), through ``POST /admin/gc``; returns the request's wall seconds and the report.
    ``before`` runs once the server is up, just before the timed request."""
    env = {"CARGOHOLD_ADMIN__TOKEN": ADMIN_TOKEN}
    with RegistryProcess(kind=CH, data_dir=data_dir, env=env) as server:
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        before()
        start = time.perf_counter()
        response = httpx.post(f"{server.url}/admin/gc", json={"grace": "0"}, headers=auth, timeout=timeout)
        seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"POST /admin/gc answered {response.status_code}: {response.text[:2000]}")
    return seconds, response.json()


# --------------------------------------------------------------------------- Distribution side
def distribution_config(data_dir: Path) -> Path:
    """The same config ``RegistryProcess`` writes, for the offline ``garbage-collect``."""
    config = data_dir / "gc-config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {data_dir}/storage\n"
        "  delete:\n    enabled: true\n"
    )
    return config


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _link(digest: str) -> bytes:
    return digest.encode()  # Distribution writes the bare digest, no newline


def distribution_write_layout(storage: Path, entries: list[Entry]) -> None:
    """Write what Distribution 2.8's filesystem driver writes for a pushed image.

    Checked against what a real push leaves on disk: blob data under
    ``blobs/sha256/<2>/<hex>/data`` (the manifest is a blob too), a ``_layers`` link per
    config and layer, a revision link for the manifest, and the tag's ``current`` and
    ``index`` links.
    """
    v2 = storage / V2
    for n, entry in enumerate(entries, 1):
        repo = v2 / "repositories" / entry.repo
        manifest_hex = entry.image.manifest_digest.split(":", 1)[1]
        for blob in [*entry.blobs, entry.image.manifest]:
            hexa = oci.sha256_digest(blob).split(":", 1)[1]
            _write(v2 / "blobs" / "sha256" / hexa[:2] / hexa / "data", blob)
        for blob in entry.blobs:
            digest = oci.sha256_digest(blob)
            _write(repo / "_layers" / "sha256" / digest.split(":", 1)[1] / "link", _link(digest))
        link = _link(entry.image.manifest_digest)
        _write(repo / "_manifests" / "revisions" / "sha256" / manifest_hex / "link", link)
        tag = repo / "_manifests" / "tags" / entry.tag
        _write(tag / "current" / "link", link)
        _write(tag / "index" / "sha256" / manifest_hex / "link", link)
        (repo / "_uploads").mkdir(exist_ok=True)
        if n % 5000 == 0:
            log(f"  distribution layout fill: {n}/{len(entries)}")


def distribution_delete_layout(storage: Path, entries: list[Entry]) -> None:
    """What Distribution's DELETE of a manifest by digest does on disk: the revision link goes,
    and so does every tag directory pointing at it (checked against a real DELETE)."""
    v2 = storage / V2
    for entry in entries:
        repo = v2 / "repositories" / entry.repo / "_manifests"
        manifest_hex = entry.image.manifest_digest.split(":", 1)[1]
        (repo / "revisions" / "sha256" / manifest_hex / "link").unlink()
        shutil.rmtree(repo / "tags" / entry.tag)


def distribution_gc(data_dir: Path, untagged: bool, timeout: float = 1200.0) -> tuple[float, dict[str, Any]]:
    """``docker-registry garbage-collect`` on a stopped registry's storage; returns seconds and counts."""
    exe = shutil.which("docker-registry")
    if exe is None:
        raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
    cmd = [exe, "garbage-collect", str(distribution_config(data_dir))]
    if untagged:
        cmd.append("--delete-untagged")
    output = data_dir / "gc.out"  # it prints a line per marked and per deleted blob
    with open(output, "wb") as out:
        start = time.perf_counter()
        run = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        seconds = time.perf_counter() - start
    text = output.read_text(errors="replace")
    if run.returncode != 0:
        raise RuntimeError(f"garbage-collect exited {run.returncode}: {text[-2000:]}")
    found = GC_SUMMARY.findall(text)
    marked, blobs, manifests = (int(x) for x in found[-1]) if found else (0, 0, 0)
    return seconds, {"marked": marked, "blobs_eligible": blobs, "manifests_eligible": manifests}


# --------------------------------------------------------------------------- checks
def verify(url: str, entries: list[Entry], sample: int = 25) -> str:
    """Kept images still pull (manifest by tag, every blob); deleted images' blobs are gone."""
    kept = [e for e in entries if not e.deleted]
    gone = [e for e in entries if e.deleted]
    rng = random.Random(7)
    kept, gone = rng.sample(kept, min(sample, len(kept))), rng.sample(gone, min(sample, len(gone)))
    bad: list[str] = []
    with httpx.Client(base_url=url, timeout=30.0) as client:
        for entry in kept:
            response = client.get(
                f"/v2/{entry.repo}/manifests/{entry.tag}", headers={"Accept": oci.OCI_MANIFEST}
            )
            if response.status_code != 200 or response.content != entry.image.manifest:
                bad.append(f"kept manifest {entry.repo}:{entry.tag} -> {response.status_code}")
            for blob in entry.blobs:
                status = client.head(f"/v2/{entry.repo}/blobs/{oci.sha256_digest(blob)}").status_code
                if status != 200:
                    bad.append(f"kept blob in {entry.repo} -> {status}")
        for entry in gone:
            for blob in entry.blobs:
                status = client.head(f"/v2/{entry.repo}/blobs/{oci.sha256_digest(blob)}").status_code
                if status != 404:
                    bad.append(f"deleted image's blob in {entry.repo} -> {status}")
    if bad:
        return f"FAILED ({len(bad)}): " + "; ".join(bad[:5])
    blobs = len(kept) * len(kept[0].blobs) if kept else 0
    return f"ok: {len(kept)} kept images ({blobs} blobs) intact, {len(gone)} deleted images' blobs 404"


def check_filled(url: str, entries: list[Entry]) -> str:
    """After a fill: a sample of images pulls, and a repository lists all its tags."""
    bad: list[str] = []
    with httpx.Client(base_url=url, timeout=30.0) as client:
        for entry in random.Random(3).sample(entries, min(20, len(entries))):
            response = client.get(
                f"/v2/{entry.repo}/manifests/{entry.tag}", headers={"Accept": oci.OCI_MANIFEST}
            )
            if response.status_code != 200 or response.content != entry.image.manifest:
                bad.append(f"{entry.repo}:{entry.tag} -> {response.status_code}")
            status = client.head(f"/v2/{entry.repo}/blobs/{oci.sha256_digest(entry.blobs[-1])}").status_code
            if status != 200:
                bad.append(f"blob in {entry.repo} -> {status}")
        repo = entries[0].repo
        expected = sum(1 for e in entries if e.repo == repo)
        tags = client.get(f"/v2/{repo}/tags/list").json().get("tags") or []
        if len(tags) != expected:
            bad.append(f"{repo} lists {len(tags)} tags, expected {expected}")
    if bad:
        raise RuntimeError("fill check failed: " + "; ".join(bad[:5]))
    return "ok"


# --------------------------------------------------------------------------- the benchmark
@dataclass
class Results:
    rows: dict[str, Row] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def record(self, name: str, unit: str, label: str, value: float, aggregate: str = "median") -> None:
        row = self.rows.setdefault(name, Row(name, unit, aggregate))
        row.samples.setdefault(label, []).append(value)
        log(f"  {name:<52} {label:<13} {value:12.2f} {unit}")

    def note(self, name: str, unit: str, label: str, text: str) -> None:
        notes = self.rows.setdefault(name, Row(name, unit)).notes.setdefault(label, [])
        if text not in notes:
            notes.append(text)


def fill_cargohold(cfg: Config, res: Results, snap: Path, entries: list[Entry]) -> None:
    name = "fill (untimed setup; method in notes)"
    log(f"== cargohold fill: {len(entries)} images via {cfg.cargohold_fill}")
    start = time.perf_counter()
    doomed = [e for e in entries if e.deleted]
    if cfg.cargohold_fill == "engine":
        cargohold_fill_engine(snap, entries, cfg.fill_workers)
        seconds = time.perf_counter() - start
        with RegistryProcess(kind=CH, data_dir=snap) as server:
            check_filled(server.url, entries)
        cargohold_delete_engine(snap, doomed)
        how = f"engine API in-process ({cfg.fill_workers} threads), deletes via Registry.delete_manifest"
    else:
        with RegistryProcess(kind=CH, data_dir=snap) as server:
            pushed = run_pool(entries, cfg.fill_clients, cfg.time_cap, push_entry, server.url)
            seconds = time.perf_counter() - start
            if pushed != len(entries):
                raise RuntimeError(
                    f"cargohold HTTP fill pushed {pushed} of {len(entries)} within the time cap"
                )
            check_filled(server.url, entries)
            run_pool(doomed, cfg.fill_clients, cfg.time_cap, delete_entry, server.url)
        how = f"HTTP, {cfg.fill_clients} clients; deletes by HTTP DELETE"
    res.facts["cargohold_filled_at"] = time.time()
    res.record(name, "images/s", CH, len(entries) / seconds)
    res.note(name, "images/s", CH, how)
    res.facts["cargohold_fill"] = {"method": how, "seconds": round(seconds, 1)}


def fill_distribution(cfg: Config, res: Results, snap: Path, entries: list[Entry]) -> None:
    name = "fill (untimed setup; method in notes)"
    storage = snap / "storage"
    doomed = [e for e in entries if e.deleted]
    mode = cfg.distribution_fill
    start = time.perf_counter()
    http_count = 0
    with RegistryProcess(kind=DIST, data_dir=snap) as server:
        if mode in ("auto", "http"):
            probe = len(entries) if mode == "http" else min(len(entries), 256)
            log(f"== distribution fill: {probe} images over HTTP ({cfg.fill_clients} clients)")
            http_count = run_pool(entries[:probe], cfg.fill_clients, cfg.time_cap, push_entry, server.url)
            rate = http_count / (time.perf_counter() - start)
            estimate = len(entries) / rate
            res.facts["distribution_http_rate"] = round(rate, 1)
            log(f"  distribution HTTP fill: {rate:.1f} images/s; all would take {estimate:.0f}s")
            if mode == "auto" and estimate <= cfg.fill_budget:
                rest = run_pool(entries[probe:], cfg.fill_clients, cfg.time_cap, push_entry, server.url)
                http_count += rest
            if mode == "http" and http_count != len(entries):
                raise RuntimeError(f"distribution HTTP fill pushed {http_count} of {len(entries)} in the cap")
    layout = entries[http_count:]
    if layout:
        log(f"== distribution fill: writing {len(layout)} images into its filesystem layout")
        distribution_write_layout(storage, layout)
    seconds = time.perf_counter() - start
    with RegistryProcess(kind=DIST, data_dir=snap) as server:
        check_filled(server.url, entries)  # the layout written by hand serves like a pushed one
        if not layout:
            run_pool(doomed, cfg.fill_clients, cfg.time_cap, delete_entry, server.url)
    if layout:
        distribution_delete_layout(storage, doomed)
    if not layout:
        how = f"HTTP, {cfg.fill_clients} clients; deletes by HTTP DELETE"
    elif http_count:
        how = (
            f"first {http_count} images over HTTP ({res.facts['distribution_http_rate']} images/s: all would "
            f"take > {cfg.fill_budget:.0f}s), the other {len(layout)} written as its filesystem layout; "
            "deletes as DELETE does on disk (revision link + tag dirs)"
        )
    else:
        how = "filesystem layout written directly; deletes as DELETE does on disk (revision link + tag dirs)"
    res.record(name, "images/s", DIST, len(entries) / seconds)
    res.note(name, "images/s", DIST, how)
    res.facts["distribution_fill"] = {"method": how, "seconds": round(seconds, 1), "http_images": http_count}


def gc_runs(cfg: Config, res: Results, snaps: dict[str, Path], entries: list[Entry]) -> None:
    """Each repetition: a fresh copy of the filled store, the timed GC, then a second
    GC with nothing left to collect; the first repetition also checks the result over HTTP."""
    blobs = len(entries) * (cfg.layers + 1)
    share = "half" if cfg.delete_every == 2 else f"1 in {cfg.delete_every}"
    timed = f"GC wall time, {len(entries):,} manifests / {blobs:,} blobs, {share} unreferenced"
    timed += ", cold cache" if cfg.cold else ""
    res.facts["gc_row"] = timed
    again = "GC wall time, 2nd run (nothing left to collect)"
    in_server = "the same first GC inside the running server (POST /admin/gc)"
    deleted = "blobs deleted by the GC"
    freed = "bytes freed by the GC"
    untagged = " --delete-untagged" if cfg.delete_untagged else ""
    settle = drop_page_cache if cfg.cold else lambda: None
    if cfg.cold:
        res.facts["cold"] = "page cache, dentries and inodes dropped before each first GC"
    for rep in range(cfg.gc_reps):
        for label in (CH, DIST) if rep % 2 == 0 else (DIST, CH):
            run = cfg.work_dir / f"{label}-run"
            log(f"== GC rep {rep + 1}/{cfg.gc_reps}: {label} (copying the filled store)")
            if label == CH:
                copy_store(snaps[CH], run)
                os.sync()
                settle()
                seconds, report = cargohold_gc(run, timeout=cfg.time_cap)
                res.record(timed, "s", CH, seconds)
                res.record(deleted, "count", CH, report["blobs_deleted"] + report["leaks_deleted"])
                res.record(freed, "KiB", CH, report["total_bytes"] / 1024)
                res.facts.setdefault("cargohold_gc_reports", []).append(
                    report | {"wall_s": round(seconds, 2)}
                )
                seconds2, _ = cargohold_gc(run, timeout=cfg.time_cap)
                res.record(again, "s", CH, seconds2)
                res.note(timed, "s", CH, "cargohold gc --grace 0 (online GC, run here with no server)")
                if rep == 0:
                    with RegistryProcess(kind=CH, data_dir=run) as server:
                        res.facts["cargohold_verify"] = verify(server.url, entries)
                    log(f"  cargohold after GC: {res.facts['cargohold_verify']}")
                shutil.rmtree(run, ignore_errors=True)
                copy_store(snaps[CH], run)
                os.sync()
                seconds, report = cargohold_gc_in_server(run, timeout=cfg.time_cap, before=settle)
                res.record(in_server, "s", CH, seconds)
                res.facts.setdefault("cargohold_in_server_reports", []).append(
                    report | {"wall_s": round(seconds, 2)}
                )
            else:
                copy_store(snaps[DIST], run)
                before = blob_files(run / "storage")
                os.sync()
                settle()
                seconds, counts = distribution_gc(run, cfg.delete_untagged, timeout=cfg.time_cap)
                after = blob_files(run / "storage")
                res.record(timed, "s", DIST, seconds)
                res.record(deleted, "count", DIST, before[0] - after[0])
                res.record(freed, "KiB", DIST, (before[1] - after[1]) / 1024)
                res.facts.setdefault("distribution_gc_counts", []).append(
                    counts | {"wall_s": round(seconds, 2), "blob_files_before": before[0], "after": after[0]}
                )
                seconds2, _ = distribution_gc(run, cfg.delete_untagged, timeout=cfg.time_cap)
                res.record(again, "s", DIST, seconds2)
                res.note(
                    timed, "s", DIST, f"docker-registry garbage-collect{untagged} (offline, registry stopped)"
                )
                res.note(deleted, "count", DIST, "includes the deleted manifests' own blobs")
                if rep == 0:
                    with RegistryProcess(kind=DIST, data_dir=run) as server:
                        res.facts["distribution_verify"] = verify(server.url, entries)
                    log(f"  distribution after GC: {res.facts['distribution_verify']}")
            shutil.rmtree(run, ignore_errors=True)


def profile_gc(cfg: Config, snap: Path, out: Path) -> list[str]:
    """One more (untimed) ``cargohold gc --grace 0`` on a fresh copy, sampled by py-spy;
    returns the frames of cargohold's own code that held the most samples."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        return ["py-spy is not installed (pip install py-spy)"]
    run = cfg.work_dir / "profile-run"
    copy_store(snap, run)
    os.sync()
    env = {**os.environ, "CARGOHOLD_DATA_DIR": str(run)}
    cmd = [spy, "record", "-r", "100", "-f", "raw", "-o", str(out), "--"]
    cmd += [*cargohold_command(), "gc", "--grace", "0", "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=cfg.time_cap)
    shutil.rmtree(run, ignore_errors=True)
    if done.returncode != 0 or not out.exists():
        return [f"py-spy failed ({done.returncode}): {done.stderr[-300:]}"]
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        frames = stack.split(";")
        total += samples
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
    mine = ("engine/", "gc/", "backends/", "cargohold/")

    def top(counts: dict[str, int], n: int) -> list[str]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        picked = [(f, c) for f, c in ranked if any(m in f for m in mine) or "sqlite" in f.lower()]
        return [f"{c / total:6.1%}  {f}" for f, c in picked[:n]]

    return [
        f"py-spy, {total} samples (100/s, all threads) of one cargohold gc --grace 0; raw data: {out}",
        "inclusive (cargohold frames):",
        *top(inclusive, 14),
        "self:",
        *top(own, 8),
    ]


class GCLoop:
    """``cargohold gc`` over and over in subprocesses until stopped; records each run's span."""

    def __init__(self, data_dir: Path, grace: str, max_runs: int = 1000) -> None:
        self.data_dir = data_dir
        self.grace = grace
        self.max_runs = max_runs
        self.runs: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.started = threading.Event()
        self.cpu_seconds = 0.0  # user + system of the GC processes (reaped children)
        self.wall_seconds = 0.0

    def _loop(self) -> None:
        for _ in range(self.max_runs):
            if self._stop.is_set():
                return
            start = time.monotonic()
            self.started.set()
            try:
                _, report = cargohold_gc(self.data_dir, self.grace, timeout=600)
                freed = report["blobs_deleted"]
            except Exception as exc:  # keep looping; the report says so
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                freed = 0
            self.runs.append({"start": start, "end": time.monotonic(), "blobs_deleted": freed})

    def __enter__(self) -> GCLoop:
        self._usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._since = time.monotonic()
        self._thread.start()
        self.started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(660)
        # Only the GC runs are reaped meanwhile (the server is still running), so the
        # children's usage delta is theirs.
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu_seconds = (usage.ru_utime - self._usage.ru_utime) + (usage.ru_stime - self._usage.ru_stime)
        self.wall_seconds = time.monotonic() - self._since

    def busy_fraction(self, start: float, end: float) -> float:
        """Share of [start, end] during which a GC process was running."""
        covered = sum(max(0.0, min(end, r["end"]) - max(start, r["start"])) for r in self.runs)
        return covered / (end - start) if end > start else 0.0


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants so far (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for each in _tree_pids(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def push_small_images(
    url: str, images: list[oci.SmallImage], clients: int, prefix: str, cap: float
) -> tuple[int, int]:
    """The harness's small-image push (HEAD/POST/PUT per blob, then the manifest, 32 threads),
    with one difference: a manifest PUT answered MANIFEST_BLOB_UNKNOWN is retried after
    uploading again, as docker does. With ``--grace 0`` a GC may sweep the blobs of an image
    whose manifest is not in yet; returns (images pushed, such retries)."""
    counter = itertools.count()
    retries = itertools.count()
    deadline = time.monotonic() + cap

    def worker(index: int) -> int:
        pushed = 0
        with httpx.Client(base_url=url, timeout=60.0) as client:
            while time.monotonic() < deadline and (i := next(counter)) < len(images):
                repo, tag = f"bench/small-{index}", f"{prefix}-{i}"
                for attempt in range(4):
                    try:
                        images[i].push(client, repo, tag)
                        break
                    except oci.RegistryError as exc:
                        if "MANIFEST_BLOB_UNKNOWN" not in str(exc) or attempt == 3:
                            raise
                        next(retries)
                pushed += 1
        return pushed

    with ThreadPoolExecutor(clients) as pool:
        pushed = sum(pool.map(worker, range(clients)))
    return pushed, next(retries)


def push_during_gc(cfg: Config, res: Results, snap: Path) -> None:
    """Small-image pushes/s on a cargohold holding the collectible backlog, without a GC and
    with ``cargohold gc --grace G`` looping beside it (one row per G). Every measurement starts
    from a fresh copy of the filled store, so each GC loop begins with the whole backlog."""
    base = f"small-image push, {cfg.clients} clients, no GC"
    modes: list[str | None] = [None, *cfg.loop_graces]

    def row(grace: str | None) -> str:
        return (
            base if grace is None else f"small-image push, {cfg.clients} clients, GC looping (grace {grace})"
        )

    # A grace protects blobs touched within it: the backlog must be older than the longest one.
    from cargohold.config import parse_duration

    oldest = max((parse_duration(g) for g in cfg.loop_graces), default=0.0)
    filled_at = res.facts.get("cargohold_filled_at", 0.0)
    if time.time() - filled_at < oldest + 5:
        wait = oldest + 5 - (time.time() - filled_at)
        log(f"waiting {wait:.0f}s for the backlog to become older than the longest grace ({oldest:.0f}s)")
        time.sleep(wait)
    run = cfg.work_dir / "push-run"
    loops: dict[str, list[dict[str, Any]]] = {}
    cores: dict[str, list[tuple[float, float]]] = {}
    for rep in range(cfg.push_reps):
        for grace in modes[rep % len(modes) :] + modes[: rep % len(modes)]:
            name = row(grace)
            log(f"== push rep {rep + 1}/{cfg.push_reps}: {name}")
            copy_store(snap, run)
            os.sync()
            images = [oci.SmallImage.random(1 + i % 2, cfg.layer_size) for i in range(cfg.images)]
            with RegistryProcess(kind=CH, data_dir=run) as server:
                assert server.proc is not None
                loop = GCLoop(run, grace) if grace is not None else None
                if loop is not None:
                    loop.__enter__()
                try:
                    server_before = tree_cpu(server.proc.pid)
                    client_before = resource.getrusage(resource.RUSAGE_SELF)
                    start = time.monotonic()
                    pushed, retries = push_small_images(
                        server.url, images, cfg.clients, f"r{rep}", cfg.time_cap
                    )
                    end = time.monotonic()
                    client_after = resource.getrusage(resource.RUSAGE_SELF)
                    server_cpu = tree_cpu(server.proc.pid) - server_before
                finally:
                    if loop is not None:
                        loop.__exit__()
            window = end - start
            client_cpu = (client_after.ru_utime - client_before.ru_utime) + (
                client_after.ru_stime - client_before.ru_stime
            )
            cores.setdefault(name, []).append((server_cpu / window, client_cpu / window))
            res.record(name, "images/s", CH, pushed / window)
            if pushed < cfg.images:
                res.note(name, "images/s", CH, f"time cap hit after {pushed} images")
            if loop is not None and grace is not None:
                first = loop.runs[0] if loop.runs else {"start": start, "end": start, "blobs_deleted": 0}
                stats = {
                    "rep": rep,
                    "window_s": round(window, 2),
                    "gc_runs_overlapping": sum(1 for r in loop.runs if r["start"] < end),
                    "gc_busy_fraction": round(loop.busy_fraction(start, end), 3),
                    "backlog_run_s": round(first["end"] - first["start"], 2),
                    "backlog_run_blobs_deleted": first["blobs_deleted"],
                    "manifest_retries": retries,
                    "gc_cores": round(loop.cpu_seconds / loop.wall_seconds, 2) if loop.wall_seconds else 0,
                    "errors": loop.errors[:3],
                }
                loops.setdefault(grace, []).append(stats)
                log(f"  GC loop: {stats}")
            shutil.rmtree(run, ignore_errors=True)
    res.facts["gc_loop"] = loops
    res.facts["cpu_cores_server_client"] = cores
    for grace, stats in loops.items():
        name = row(grace)
        res.note(
            name,
            "images/s",
            CH,
            "GC busy "
            + ", ".join(f"{s['gc_busy_fraction']:.0%}" for s in stats)
            + " of the push windows ("
            + ", ".join(f"{s['window_s']:.1f}s" for s in stats)
            + "); first (backlog) run "
            + ", ".join(f"{s['backlog_run_s']:.1f}s/{s['backlog_run_blobs_deleted']} blobs" for s in stats)
            + "; GC runs overlapping "
            + ", ".join(str(s["gc_runs_overlapping"]) for s in stats),
        )
        if any(s["manifest_retries"] for s in stats):
            res.note(
                name,
                "images/s",
                CH,
                "images whose manifest PUT got MANIFEST_BLOB_UNKNOWN (the GC swept their just-uploaded "
                "blobs) and were pushed again: " + ", ".join(str(s["manifest_retries"]) for s in stats),
            )
    for name, pairs in cores.items():
        gc_part = ""
        for grace, stats in loops.items():
            if row(grace) == name:
                gc_part = "GC processes " + ", ".join(f"{s['gc_cores']:.2f}" for s in stats) + "; "
        res.note(
            name,
            "images/s",
            CH,
            "CPU cores used (of 2): "
            + gc_part
            + "server tree "
            + ", ".join(f"{a:.2f}" for a, _ in pairs)
            + "; push client "
            + ", ".join(f"{b:.2f}" for _, b in pairs),
        )


def verdicts(res: Results) -> list[str]:
    lines = []
    timed = res.rows.get(res.facts.get("gc_row", ""))
    if timed and timed.value(CH) and timed.value(DIST):
        speedup = timed.value(DIST) / timed.value(CH)  # type: ignore[operator]
        res.facts["gc_speedup"] = round(speedup, 2)
        verdict = "MET" if speedup >= 20 else "NOT MET"
        lines.append(f"GC speedup Distribution/cargohold: {speedup:.1f}x (goal >= 20x): {verdict}")
        in_server = next((r for r in res.rows.values() if "inside the running server" in r.name), None)
        if in_server and in_server.value(CH):
            speedup = timed.value(DIST) / in_server.value(CH)  # type: ignore[operator]
            res.facts["gc_speedup_in_server"] = round(speedup, 2)
            lines.append(f"the same with cargohold's GC inside the running server: {speedup:.1f}x")
    base = next((r for r in res.rows.values() if r.name.endswith("no GC")), None)
    for busy in (r for r in res.rows.values() if "GC looping" in r.name):
        if base and base.value(CH) and busy.value(CH):
            change = busy.value(CH) / base.value(CH) - 1  # type: ignore[operator]
            grace = busy.name.rsplit("(", 1)[-1].rstrip(")")
            res.facts.setdefault("push_change_with_gc", {})[grace] = round(change, 4)
            lines.append(
                f"small-image push with GC looping ({grace}) vs without: {change:+.1%} "
                f"(goal within 10%): {'MET' if change >= -0.10 else 'NOT MET'}"
            )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadtests.gc_bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
    )
    p.add_argument("--manifests", type=int, help="images in the content (default 20000)")
    p.add_argument(
        "--layers", type=int, default=4, help="layers per image (blobs per image = layers + config)"
    )
    p.add_argument("--blob-bytes", default="64-512", help="layer size range in bytes, LOW-HIGH")
    p.add_argument("--per-repo", type=int, default=200, help="images per repository")
    p.add_argument(
        "--cold", action="store_true", help="drop the page cache before each first GC (Linux, as root)"
    )
    p.add_argument(
        "--delete-every", type=int, default=2, metavar="N", help="delete one manifest in N (default 2: half)"
    )
    p.add_argument("--gc-reps", type=int, help="timed GC repetitions per registry (default 3)")
    p.add_argument("--cargohold-fill", choices=("engine", "http"), default="engine")
    p.add_argument(
        "--distribution-fill",
        choices=("auto", "http", "layout"),
        default="auto",
        help="auto: HTTP if a 256-image probe says the whole fill fits --fill-budget, else layout",
    )
    p.add_argument("--fill-budget", type=float, default=600.0, help="seconds an HTTP fill may take (auto)")
    p.add_argument("--fill-clients", type=int, default=32, help="concurrent HTTP pushers for fills")
    p.add_argument("--fill-workers", type=int, default=4, help="threads for the cargohold engine fill")
    p.add_argument(
        "--delete-untagged", action="store_true", help="pass --delete-untagged to Distribution's GC"
    )
    p.add_argument("--images", type=int, help="small images per push measurement (default 256)")
    p.add_argument("--clients", type=int, default=32, help="concurrent small-image pushers")
    p.add_argument("--layer-kib", type=int, default=16, help="small-image layer size in KiB")
    p.add_argument("--push-reps", type=int, help="repetitions of the push-with/without-GC pair (default 3)")
    p.add_argument(
        "--loop-grace",
        default="0,60s",
        help="comma list: --grace of the looping GC, a row each (60s keeps in-flight pushes' blobs)",
    )
    p.add_argument("--parts", default="gc,push", help="comma list of gc, push")
    p.add_argument("--time-cap", type=float, default=1200.0, help="upper bound in seconds for any loop or GC")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S", help="wait up to S s for load < 0.5")
    p.add_argument("--profile-gc", type=Path, metavar="RAW", help="also sample one cargohold GC with py-spy")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, work_dir: Path) -> Config:
    def pick(name: str, default: int) -> int:
        given = getattr(args, name)
        return int(given if given is not None else QUICK[name] if args.quick else default)

    low, high = (int(x) for x in args.blob_bytes.split("-"))
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    for part in parts:
        if part not in ("gc", "push"):
            raise SystemExit(f"unknown part {part!r}")
    return Config(
        manifests=pick("manifests", 20_000),
        layers=args.layers,
        blob_min=low,
        blob_max=high,
        per_repo=args.per_repo,
        delete_every=args.delete_every,
        cold=args.cold,
        gc_reps=pick("gc_reps", 3),
        cargohold_fill=args.cargohold_fill,
        distribution_fill=args.distribution_fill,
        fill_budget=args.fill_budget,
        fill_clients=args.fill_clients,
        fill_workers=args.fill_workers,
        delete_untagged=args.delete_untagged,
        images=pick("images", 256),
        clients=args.clients,
        layer_size=args.layer_kib * 1024,
        push_reps=pick("push_reps", 3),
        loop_graces=tuple(g.strip() for g in args.loop_grace.split(",") if g.strip()),
        parts=parts,
        time_cap=args.time_cap,
        profile=args.profile_gc.absolute() if args.profile_gc else None,
        work_dir=work_dir,
    )


def run(cfg: Config) -> dict[str, Any]:
    started = time.monotonic()
    load_before, warning = load_at_start()
    res = Results()
    entries = make_content(cfg)
    blobs = len(entries) * (cfg.layers + 1)
    log(f"content: {len(entries)} images, {blobs} blobs, {len({e.repo for e in entries})} repositories")
    snaps = {CH: cfg.work_dir / "cargohold-filled", DIST: cfg.work_dir / "distribution-filled"}
    fill_cargohold(cfg, res, snaps[CH], entries)
    if "gc" in cfg.parts:
        fill_distribution(cfg, res, snaps[DIST], entries)
        for label, path in snaps.items():
            res.facts[f"{label}_store_bytes"] = tree_bytes(path)
        gc_runs(cfg, res, snaps, entries)
        if cfg.profile is not None:
            res.facts["profile"] = profile_gc(cfg, snaps[CH], cfg.profile)
        shutil.rmtree(snaps[DIST], ignore_errors=True)
    if "push" in cfg.parts:
        push_during_gc(cfg, res, snaps[CH])
    rows = [row for row in res.rows.values() if row.samples or row.notes]
    elapsed = time.monotonic() - started
    print(format_table(rows, [CH, DIST]))
    print()
    for line in verdicts(res):
        print(line)
    for label in (CH, DIST):
        if f"{label}_verify" in res.facts:
            print(f"{label} after GC: {res.facts[f'{label}_verify']}")
    print(
        f"content: {len(entries):,} images x {cfg.layers + 1} blobs "
        f"({cfg.blob_min}-{cfg.blob_max} B layers) in "
        f"{len({e.repo for e in entries})} repositories; one manifest in {cfg.delete_every} deleted "
        "by digest; medians of "
        f"{cfg.gc_reps} GC reps and {cfg.push_reps} push reps (alternating order); runtime {elapsed:.0f}s"
    )
    if warning:
        print(f"WARNING: {warning}")
    if res.facts.get("profile"):
        print("\n" + "\n".join(res.facts["profile"]))
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
        "runtime_s": round(elapsed, 1),
        "load_average_before": load_before,
        "rows": [row.as_dict([CH, DIST]) for row in rows],
        "facts": res.facts,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with work_directory("cargohold-gcbench-") as work_dir:
        cfg = build_config(args, work_dir)
        wait_for_idle(args.wait_idle)
        result = run(cfg)
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
