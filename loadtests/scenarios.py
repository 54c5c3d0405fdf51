"""The benchmark scenarios. Each fills rows of a ``Bench``; untimed setup stays outside ``measure``."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import httpx

from loadtests import loadgen, oci
from loadtests.harness import MIB, Bench, Target, log
from loadtests.rss import PeakMemory

BIG_REPO = "bench/big"
HOT_REPO = "bench/hot"
TAGS_REPO = "bench/tags"


def _size_label(size: int) -> str:
    return f"{size / MIB / 1024:g} GiB" if size >= 1024 * MIB else f"{size / MIB:g} MiB"


def _record_memory(bench: Bench, phase: str, target: Target, memory: PeakMemory) -> None:
    """Peaks are reported as the max over repetitions: the question is "how high can it go"."""
    bench.record(f"peak server RSS (tree sum), {phase}", "MiB", target, memory.peak_rss / MIB, "max")
    bench.record(f"peak server PSS (tree sum), {phase}", "MiB", target, memory.peak_pss / MIB, "max")


def _push_large(bench: Bench, chunked: bool) -> None:
    """Push a fresh random blob to each target per repetition, recording MB/s and peak RSS."""
    cfg = bench.config
    mode = f"chunked {cfg.chunk_size // MIB} MiB" if chunked else "monolithic"
    name = f"blob push {mode}, {_size_label(cfg.blob_size)}"
    for rep in range(cfg.reps):
        log(f"[{name}] rep {rep + 1}/{cfg.reps}: writing random blob")
        blob = oci.write_random_blob(cfg.work_dir / "push.bin", cfg.blob_size)
        try:
            for target in bench.order(rep):
                os.sync()  # start each side with no dirty pages left over from the other's push
                with target.client() as client, PeakMemory(target.pid) as memory:
                    if chunked:
                        upload = partial(oci.push_chunked, client, BIG_REPO, blob, cfg.chunk_size)
                    else:
                        upload = partial(oci.push_monolithic, client, BIG_REPO, blob)
                    done = bench.measure(name, "MB/s", target, upload)
                if done is not None:
                    bench.record(name, "MB/s", target, blob.size / done[1] / 1e6)
                    _record_memory(bench, f"{mode} push", target, memory)
        finally:
            blob.path.unlink(missing_ok=True)


def push_monolithic(bench: Bench) -> None:
    _push_large(bench, chunked=False)


def push_chunked(bench: Bench) -> None:
    _push_large(bench, chunked=True)


def _push_and_verify(target: Target, blob: oci.BlobFile) -> None:
    with target.client() as client:
        oci.push_monolithic(client, BIG_REPO, blob)
    oci.pull_blob(target.url, BIG_REPO, blob.digest, verify=True)


def pull(bench: Bench) -> None:
    """Pull one blob repeatedly (about 2 GiB per measurement so a run lasts long enough to time)."""
    cfg = bench.config
    name = f"blob pull, {_size_label(cfg.blob_size)}"
    rounds = max(1, min(16, (2048 * MIB) // cfg.blob_size))
    log(f"[{name}] setup: pushing and verifying one blob per target")
    blob = oci.write_random_blob(cfg.work_dir / "pull.bin", cfg.blob_size)
    ready: list[Target] = []
    try:
        for target in bench.targets:
            if bench.measure(name, "MB/s", target, partial(_push_and_verify, target, blob)) is not None:
                ready.append(target)
    finally:
        blob.path.unlink(missing_ok=True)

    def pull_rounds(target: Target) -> int:
        return sum(oci.pull_blob(target.url, BIG_REPO, blob.digest) for _ in range(rounds))

    for rep in range(cfg.reps):
        log(f"[{name}] rep {rep + 1}/{cfg.reps} ({rounds} pulls each)")
        for target in bench.order(rep):
            if target not in ready:
                continue
            with PeakMemory(target.pid) as memory:
                done = bench.measure(name, "MB/s", target, partial(pull_rounds, target))
            if done is not None:
                received, seconds = done
                if received != rounds * blob.size:
                    bench.note(name, "MB/s", target, f"short read: {received} of {rounds * blob.size} bytes")
                bench.record(name, "MB/s", target, received / seconds / 1e6)
                _record_memory(bench, "pull", target, memory)


def _push_small_images(
    target: Target, images: list[oci.SmallImage], clients: int, prefix: str, cap: float
) -> int:
    """Push ``images`` from ``clients`` threads (one connection each); return how many finished."""
    counter = itertools.count()  # next() on it is atomic under the GIL
    deadline = time.monotonic() + cap

    def worker(index: int) -> int:
        pushed = 0
        with target.client(timeout=60.0) as client:
            while time.monotonic() < deadline and (i := next(counter)) < len(images):
                images[i].push(client, f"bench/small-{index}", f"{prefix}-{i}")
                pushed += 1
        return pushed

    with ThreadPoolExecutor(clients) as pool:
        return sum(pool.map(worker, range(clients)))


def small_images(bench: Bench) -> None:
    """Concurrent pushes of small images: HEAD+POST+PUT per blob, then the manifest PUT."""
    cfg = bench.config
    name = f"small-image push, {cfg.clients} clients"
    for rep in range(cfg.reps):
        log(f"[{name}] rep {rep + 1}/{cfg.reps} ({cfg.images} images each)")
        for target in bench.order(rep):
            images = [oci.SmallImage.random(1 + i % 2, cfg.layer_size) for i in range(cfg.images)]
            push = partial(_push_small_images, target, images, cfg.clients, f"r{rep}", cfg.time_cap)
            done = bench.measure(name, "images/s", target, push)
            if done is not None:
                pushed, seconds = done
                if pushed < cfg.images:
                    bench.note(name, "images/s", target, f"time cap hit after {pushed} images")
                bench.record(name, "images/s", target, pushed / seconds)


def _hot_image(bench: Bench) -> tuple[oci.SmallImage, list[str]]:
    """One small image for the read-heavy scenarios, pushed once; returns it and the labels that took it."""
    if "hot" not in bench.cache:
        image = oci.SmallImage.random(1, bench.config.layer_size)
        pushed = []
        for target in bench.targets:
            with target.client() as client:
                if bench.measure(
                    "hot image setup", "", target, partial(image.push, client, HOT_REPO, "latest")
                ):
                    pushed.append(target.label)
        bench.cache["hot"] = (image, pushed)
    return bench.cache["hot"]  # type: ignore[return-value]


def _rate_scenario(
    bench: Bench,
    name: str,
    paths: dict[str, str],
    method: str,
    headers: dict[str, str],
    check: Callable[[httpx.Response], bool],
    connections: int,
    timeout: float = 10.0,
) -> None:
    """Interleaved fixed-duration load runs on one path per target label, after one checked request.

    The check matters because wrk counts a fast 404 as happily as a 200.
    """
    cfg = bench.config
    unit = "req/s"
    tool = loadgen.generator_name(method)
    name = f"{name} [{tool}]"
    checked: dict[str, str] = {}
    for target in bench.targets:
        if target.label not in paths:
            continue
        url = target.url + paths[target.label]
        response = httpx.request(method, url, headers=headers, timeout=60.0)
        if check(response):
            checked[target.label] = url
        else:
            bench.note(name, unit, target, f"check failed: {method} -> {response.status_code}")
    for rep in range(cfg.reps):
        log(f"[{name}] rep {rep + 1}/{cfg.reps} ({cfg.duration:g}s each)")
        for target in bench.order(rep):
            if target.label not in checked:
                continue
            load = partial(
                loadgen.run_load,
                checked[target.label],
                method=method,
                headers=headers,
                connections=connections,
                duration=cfg.duration,
                threads=cfg.wrk_threads,
                timeout=timeout,
            )
            done = bench.measure(name, unit, target, load)
            if done is None:
                continue
            result = done[0]
            if result.requests == 0:
                bench.note(name, unit, target, f"{tool} completed no request")
                continue
            if result.errors:
                bench.note(name, unit, target, f"{result.errors} failed of {result.requests} requests")
            bench.record(name, unit, target, result.rate)
            if "p99_ms" in result.extra:
                bench.record(f"{name}: p99 latency", "ms", target, result.extra["p99_ms"])


def manifest_get(bench: Bench) -> None:
    _, labels = _hot_image(bench)
    _rate_scenario(
        bench,
        f"manifest GET by tag, {bench.config.connections} conns",
        dict.fromkeys(labels, f"/v2/{HOT_REPO}/manifests/latest"),
        "GET",
        {"Accept": oci.MANIFEST_ACCEPT},
        lambda r: r.status_code == 200 and r.headers.get("docker-content-digest") is not None,
        bench.config.connections,
    )


def blob_head(bench: Bench) -> None:
    image, labels = _hot_image(bench)
    _rate_scenario(
        bench,
        f"blob HEAD, {bench.config.connections} conns",
        dict.fromkeys(labels, f"/v2/{HOT_REPO}/blobs/{oci.sha256_digest(image.layers[0])}"),
        "HEAD",
        {},
        lambda r: r.status_code == 200 and r.headers.get("content-length") is not None,
        bench.config.connections,
    )


def _fill_tags(target: Target, image: oci.SmallImage, count: int, clients: int, cap: float) -> int:
    """Tag one manifest ``count`` times from a thread pool; return how many tags were written."""
    with target.client() as client:
        image.push_blobs(client, TAGS_REPO)
    counter = itertools.count()
    deadline = time.monotonic() + cap

    def worker(_: int) -> int:
        written = 0
        with target.client(timeout=60.0) as client:
            while time.monotonic() < deadline and (i := next(counter)) < count:
                image.put_manifest(client, TAGS_REPO, f"t{i:05d}")
                written += 1
        return written

    with ThreadPoolExecutor(clients) as pool:
        return sum(pool.map(worker, range(clients)))


def tags_list(bench: Bench) -> None:
    """Fill a repository with N tags (timed once, as a bonus row), then load its full tag list."""
    cfg = bench.config
    name = f"tags list, {cfg.tags} tags, {cfg.tag_connections} conns"
    fill = f"tag fill: manifest PUT, {cfg.tag_fill_clients} clients (1 run)"
    image = oci.SmallImage.random(1, cfg.layer_size)
    paths: dict[str, str] = {}
    for target in bench.targets:
        log(f"[{name}] setup: tagging {cfg.tags} times on {target.label}")
        fill_tags = partial(_fill_tags, target, image, cfg.tags, cfg.tag_fill_clients, cfg.time_cap)
        done = bench.measure(fill, "req/s", target, fill_tags)
        if done is None:
            continue
        written, seconds = done
        bench.record(fill, "req/s", target, written / seconds)
        with target.client() as client:
            count, pages = oci.list_all_tags(client, TAGS_REPO, cfg.tags)
        if count != cfg.tags:
            bench.note(name, "req/s", target, f"tag list has {count} tags, expected {cfg.tags}")
        if pages != 1:
            # wrk can only replay one URL; a server that pages below N would need a client loop.
            bench.note(name, "req/s", target, f"the list came in {pages} pages; measured the first only")
        paths[target.label] = f"/v2/{TAGS_REPO}/tags/list?n={cfg.tags}"
    _rate_scenario(
        bench,
        name,
        paths,
        "GET",
        {},
        lambda r: r.status_code == 200 and len(r.json().get("tags") or []) > 0,
        cfg.tag_connections,
        timeout=30.0,
    )


SCENARIOS: dict[str, Callable[[Bench], None]] = {
    "push-mono": push_monolithic,
    "push-chunked": push_chunked,
    "pull": pull,
    "small-images": small_images,
    "manifest-get": manifest_get,
    "blob-head": blob_head,
    "tags-list": tags_list,
}
