"""GC against a running server: the scheduler inside ``cargohold serve``, the admin API,
and the race test, where clients push images that share layers while the GC runs with
no grace period and other images are deleted."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cargohold.engine.errors import StorageUnavailable
from cargohold.engine.jobs import JobAlreadyRunning
from cargohold.gc import collect
from tests.engine.conftest import make_registry
from tests.support.consistency import check_data_dir
from tests.support.servers import RegistryProcess

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TOKEN = "admin-secret-for-tests"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_for(config: bytes, layers: list[bytes]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(x), "size": len(x)}
                for x in layers
            ],
        }
    ).encode()


class Pusher:
    """Pushes like a real client: HEAD first and skip what exists; when the manifest PUT says a
    blob is unknown (the GC swept it meanwhile), upload the blobs again and retry."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.skipped_uploads = 0
        self.retries = 0

    def ensure_blob(self, repo: str, data: bytes) -> None:
        if self.client.head(f"/v2/{repo}/blobs/{sha256(data)}").status_code == 200:
            self.skipped_uploads += 1
            return
        response = self.client.post(
            f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(data)}, content=data
        )
        assert response.status_code == 201, response.text

    def push(self, repo: str, tag: str, config: bytes, layers: list[bytes]) -> bytes:
        manifest = manifest_for(config, layers)
        for _attempt in range(50):
            for blob in [config, *layers]:
                self.ensure_blob(repo, blob)
            response = self.client.put(
                f"/v2/{repo}/manifests/{tag}", content=manifest, headers={"Content-Type": OCI_MANIFEST}
            )
            if response.status_code == 201:
                return manifest
            assert response.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN", response.text
            self.retries += 1
        raise AssertionError("push never succeeded")


def test_admin_api_runs_gc_and_reports(tmp_path: Path) -> None:
    env = {"CARGOHOLD_ADMIN__TOKEN": TOKEN, "CARGOHOLD_GC__GRACE_PERIOD": "0"}
    with (
        RegistryProcess(data_dir=tmp_path / "data", env=env) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        orphan = os.urandom(5000)
        client.post("/v2/adm/app/blobs/uploads/", params={"digest": sha256(orphan)}, content=orphan)
        assert client.post("/admin/gc").status_code == 401
        assert client.post("/admin/gc", headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        plan = client.post("/admin/gc", json={"dry_run": True}, headers=auth)
        assert plan.status_code == 200 and plan.json()["bytes_freed"] == len(orphan)
        assert client.post("/admin/gc", content=b"not json", headers=auth).status_code == 400
        assert client.post("/admin/gc", json={"grace": "soon"}, headers=auth).status_code == 400
        assert client.post("/admin/gc", json={"scan_leaks": "yes"}, headers=auth).status_code == 400
        done = client.post("/admin/gc", json={}, headers=auth)
        assert done.status_code == 200 and done.json()["blobs_deleted"] == 1 and done.json()["leak_scan"]
        again = client.post("/admin/gc", json={}, headers=auth).json()  # listed a moment ago
        assert not again["leak_scan"]
        assert client.post("/admin/gc", json={"scan_leaks": True}, headers=auth).json()["leak_scan"]
        runs = client.get("/admin/gc/runs", headers=auth).json()
        assert [run["dry_run"] for run in runs] == [False, False, False, True]
        assert client.get("/admin/usage", headers=auth).json()["stored_bytes"] == 0
        assert client.head(f"/v2/adm/app/blobs/{sha256(orphan)}").status_code == 404


def test_admin_api_is_off_without_a_token(registry: RegistryProcess) -> None:
    assert httpx.post(f"{registry.url}/admin/gc").status_code == 404


def test_scheduled_gc_runs_inside_serve_once_per_tick(tmp_path: Path) -> None:
    env = {
        "CARGOHOLD_GC__SCHEDULE": "* * * * * *",
        "CARGOHOLD_GC__GRACE_PERIOD": "0",
        "CARGOHOLD_WORKERS": "2",
    }
    with RegistryProcess(data_dir=tmp_path / "data", env=env) as server:
        orphan = os.urandom(3000)
        httpx.post(
            f"{server.url}/v2/sched/app/blobs/uploads/", params={"digest": sha256(orphan)}, content=orphan
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if httpx.head(f"{server.url}/v2/sched/app/blobs/{sha256(orphan)}").status_code == 404:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the scheduled GC never collected the orphan blob")
        time.sleep(2)
    db = sqlite3.connect(tmp_path / "data" / "metadata.db")
    runs = db.execute(
        "SELECT started_at, finished_at FROM job_runs WHERE kind = 'gc' ORDER BY started_at"
    ).fetchall()
    assert len(runs) >= 2
    for (_, previous_end), (next_start, _) in itertools.pairwise(runs):
        assert next_start >= previous_end - 0.001, "two GC runs overlapped"


@pytest.mark.slow
def test_race_pushes_deletes_and_gc_without_grace(tmp_path: Path) -> None:
    """A minute of pushes sharing layers, deletes and a GC looping with no grace period."""
    duration = float(os.environ.get("CARGOHOLD_RACE_SECONDS", "60"))
    rng = random.Random(11)
    shared = [os.urandom(rng.randint(1000, 200_000)) for _ in range(6)]
    data_dir = tmp_path / "data"
    env = {
        "CARGOHOLD_WORKERS": "2",
        "CARGOHOLD_GC__SCHEDULE": "* * * * * *",
        "CARGOHOLD_GC__GRACE_PERIOD": "0",
    }
    live: dict[tuple[str, str], bytes] = {}
    deleted: list[bytes] = []
    lock = threading.Lock()
    stop = threading.Event()
    counters = {"gc_runs": 0, "pushed": 0, "retries": 0, "skipped": 0}

    with RegistryProcess(data_dir=data_dir, env=env) as server:
        registry = make_registry(data_dir)

        def gc_loop() -> None:
            while not stop.is_set():
                try:
                    collect(registry, grace_seconds=0)
                    counters["gc_runs"] += 1
                except (JobAlreadyRunning, StorageUnavailable):
                    time.sleep(0.01)

        def client_loop(worker: int) -> None:
            local = random.Random(worker)
            with httpx.Client(base_url=server.url, timeout=30) as client:
                pusher = Pusher(client)
                i = 0
                while not stop.is_set():
                    repo, tag = f"race/w{worker % 3}", f"w{worker}-{i}"
                    layers = [
                        local.choice(shared),
                        local.choice(shared),
                        os.urandom(local.randint(100, 50_000)),
                    ]
                    config = json.dumps({"w": worker, "i": i}).encode()
                    manifest = pusher.push(repo, tag, config, layers)
                    with lock:
                        live[(repo, tag)] = manifest
                        counters["pushed"] += 1
                        victim = local.choice(list(live)) if len(live) > 5 and local.random() < 0.4 else None
                        gone = live.pop(victim) if victim else None
                    if victim and gone is not None:
                        response = client.delete(f"/v2/{victim[0]}/manifests/{sha256(gone)}")
                        assert response.status_code in (202, 404), response.text
                        deleted.append(gone)
                    i += 1
                with lock:
                    counters["retries"] += pusher.retries
                    counters["skipped"] += pusher.skipped_uploads

        gc_thread = threading.Thread(target=gc_loop)
        gc_thread.start()
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client_loop, w) for w in range(6)]
            time.sleep(duration)
            stop.set()
            for future in futures:
                future.result()
        gc_thread.join()

        # Every image still tagged pulls completely with matching digests.
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for (repo, tag), manifest in live.items():
                got = client.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
                assert got.status_code == 200 and got.content == manifest, (repo, tag)
                doc = json.loads(manifest)
                for descriptor in [doc["config"], *doc["layers"]]:
                    blob = client.get(f"/v2/{repo}/blobs/{descriptor['digest']}")
                    assert blob.status_code == 200 and sha256(blob.content) == descriptor["digest"]

        # A last GC reclaims everything unreachable: only referenced blobs remain stored.
        collect(registry, grace_seconds=0)
        conn = registry.store.read()
        unreferenced = conn.execute("SELECT COUNT(*) FROM blobs WHERE manifest_refs = 0").fetchone()[0]
        rows = {r[0] for r in conn.execute("SELECT storage_key FROM blobs WHERE state = 'live'")}
        stored = {info.key for info in registry.backend.list("blobs/")}
    assert unreferenced == 0
    assert stored == rows
    assert check_data_dir(data_dir) == []
    print(f"race: {counters} live={len(live)} deleted={len(deleted)}")
    assert counters["pushed"] > 50 and counters["gc_runs"] > 10 and len(deleted) > 10


def test_read_only_switch_through_the_admin_api(tmp_path: Path) -> None:
    env = {"CARGOHOLD_ADMIN__TOKEN": TOKEN, "CARGOHOLD_WORKERS": "2"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with (
        RegistryProcess(data_dir=tmp_path / "data", env=env) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        blob = b"kept readable"
        client.post("/v2/ro/app/blobs/uploads/", params={"digest": sha256(blob)}, content=blob)
        assert client.put("/admin/read-only", json={"enabled": True}).status_code == 401
        assert client.put("/admin/read-only", json={"enabled": "yes"}, headers=auth).status_code == 400
        assert (
            client.put("/admin/read-only", json={"enabled": True}, headers=auth).json()["read_only"] is True
        )
        time.sleep(1.2)  # every worker re-reads the switch within a second
        for _ in range(4):  # whichever worker answers
            refused = client.post("/v2/ro/app/blobs/uploads/")
            assert refused.status_code == 405 and refused.json()["errors"][0]["code"] == "UNSUPPORTED"
            assert "read-only" in refused.json()["errors"][0]["message"]
            assert client.get(f"/v2/ro/app/blobs/{sha256(blob)}").content == blob
        assert (
            client.put("/admin/read-only", json={"enabled": None}, headers=auth).json()["read_only"] is False
        )
        time.sleep(1.2)
        assert client.post("/v2/ro/app/blobs/uploads/").status_code == 202
