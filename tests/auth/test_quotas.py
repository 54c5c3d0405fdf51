"""Storage quotas over real HTTP: refusals before bytes are stored, dedup-aware counting,
mounts, concurrent pushes, the 80% warning event (through a webhook), skopeo's message,
and ``cargohold du``. Each test has a namespace of its own on one registry (two workers)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner

from cargohold.backends import FilesystemBackend
from cargohold.cli import main
from cargohold.engine import MetadataStore, Registry
from cargohold.engine.errors import QuotaExceeded
from cargohold.engine.names import repository_glob
from cargohold.engine.quotas import Quota
from tests.api.oci import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    descriptor,
    encode,
    image_manifest,
    push_blob,
    sha256,
    start_upload,
    with_query,
)
from tests.auth.conftest import error_code
from tests.engine.conftest import push_image as engine_push
from tests.replication.support import push_image, wait_for
from tests.replication.test_webhooks import Receiver
from tests.support.clients import Skopeo
from tests.support.consistency import check_data_dir
from tests.support.oci_layout import build_image, write_oci_layout
from tests.support.servers import RegistryProcess

KiB = 1024
MiB = 1024 * KiB
ADMIN = {"Authorization": "Bearer quota-admin"}
NAMESPACES = ("q-full", "q-dedup", "q-mount", "q-race", "q-warn", "q-skopeo")


@dataclass
class QuotaRegistry:
    server: RegistryProcess
    hook: Receiver
    config: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def data_dir(self) -> Path:
        assert self.server.data_dir is not None
        return self.server.data_dir

    def used(self, namespace: str) -> int:
        response = httpx.get(f"{self.url}/admin/usage", headers=ADMIN, timeout=10)
        assert response.status_code == 200, response.text
        quota = next(q for q in response.json()["quotas"] if q["repositories"] == f"{namespace}/**")
        return quota["used_bytes"]


@pytest.fixture(scope="module")
def quota_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuotaRegistry]:
    data_dir = tmp_path_factory.mktemp("quota-registry")
    hook = Receiver()
    config = data_dir / "cargohold.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "admin": {"token": "quota-admin"},
                "quotas": [
                    {"repositories": f"{name}/**", "bytes": "4MiB" if name == "q-dedup" else "1MiB"}
                    for name in NAMESPACES
                ],
                "webhooks": {
                    "poll_interval": 0.1,
                    "endpoints": [
                        {
                            "name": "quota-hook",
                            "url": hook.url,
                            "repositories": ["q-warn/**"],
                            "actions": ["push", "quota.warning"],
                        }
                    ],
                },
            }
        )
    )
    server = RegistryProcess(
        data_dir=data_dir, env={"CARGOHOLD_CONFIG": str(config), "CARGOHOLD_WORKERS": "2"}
    )
    server.start()
    try:
        yield QuotaRegistry(server, hook, config)
    finally:
        server.cleanup()
        hook.close()


@pytest.fixture
def client(quota_registry: QuotaRegistry) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=quota_registry.url, timeout=60) as c:
        yield c


def assert_quota_denied(response: httpx.Response, namespace: str) -> None:
    assert response.status_code == 403, f"{response.status_code} {response.text}"
    assert error_code(response) == "DENIED"
    message = response.json()["errors"][0]["message"]
    assert f"storage quota of {namespace}/** exceeded" in message, message


def stored_objects(data_dir: Path) -> set[str]:
    return {path.name for path in (data_dir / "blobs" / "objects").rglob("*") if path.is_file()}


def staged_uploads(data_dir: Path) -> set[str]:
    return {path.name for path in (data_dir / "blobs" / "staging").iterdir()}


def counted_from_rows(data_dir: Path, pattern: str) -> int:
    """The namespace's use, recomputed from the link rows: each distinct digest once."""
    glob = repository_glob(pattern)
    db = sqlite3.connect(data_dir / "metadata.db")
    try:
        ids = [rid for rid, name in db.execute("SELECT id, name FROM repositories") if glob.fullmatch(name)]
        sizes: dict[str, int] = {}
        for rid in ids:
            sizes.update(
                db.execute(
                    "SELECT rb.digest, b.size FROM repository_blobs rb JOIN blobs b ON b.digest = rb.digest "
                    "WHERE rb.repository_id = ?",
                    (rid,),
                ).fetchall()
            )
            sizes.update(db.execute("SELECT digest, size FROM manifests WHERE repository_id = ?", (rid,)))
        return sum(sizes.values())
    finally:
        db.close()


def test_a_push_that_would_exceed_is_denied_and_leaves_nothing_stored(
    quota_registry: QuotaRegistry, client: httpx.Client
) -> None:
    first = os.urandom(600 * KiB)
    push_blob(client, "q-full/app", first)
    objects, staged = stored_objects(quota_registry.data_dir), staged_uploads(quota_registry.data_dir)
    refused: list[str] = []

    # A monolithic POST whose Content-Length does not fit: refused before a byte is read.
    big = os.urandom(500 * KiB)
    refused.append(sha256(big))
    response = client.post("/v2/q-full/app/blobs/uploads/", params={"digest": sha256(big)}, content=big)
    assert_quota_denied(response, "q-full")

    # A chunked PATCH (no length declared): cut off once it stops fitting; the session goes.
    other = os.urandom(500 * KiB)
    refused.append(sha256(other))
    location = start_upload(client, "q-full/app").headers["location"]
    response = client.patch(
        location, content=iter([other[i : i + 64 * KiB] for i in range(0, len(other), 64 * KiB)])
    )
    assert_quota_denied(response, "q-full")
    assert client.get(location).status_code == 404

    # A PATCH that fits, then a closing PUT whose body does not.
    third = os.urandom(500 * KiB)
    refused.append(sha256(third))
    location = start_upload(client, "q-full/app").headers["location"]
    response = client.patch(
        location, content=third[: 200 * KiB], headers={"Content-Range": f"0-{200 * KiB - 1}"}
    )
    assert response.status_code == 202, response.text
    response = client.put(
        with_query(response.headers["location"], {"digest": sha256(third)}), content=third[200 * KiB :]
    )
    assert_quota_denied(response, "q-full")

    for digest in refused:
        assert client.head(f"/v2/q-full/app/blobs/{digest}").status_code == 404
    assert stored_objects(quota_registry.data_dir) == objects
    assert staged_uploads(quota_registry.data_dir) <= staged
    assert (
        quota_registry.used("q-full") == len(first) == counted_from_rows(quota_registry.data_dir, "q-full/**")
    )
    assert check_data_dir(quota_registry.data_dir) == []

    # What still fits goes in; then a manifest that does not fit (its blobs are all there).
    filler = os.urandom(1 * MiB - len(first) - 100)
    push_blob(client, "q-full/app", filler)
    assert quota_registry.used("q-full") == 1 * MiB - 100
    manifest = encode(image_manifest(descriptor(OCI_CONFIG, first), [descriptor(OCI_LAYER, filler)]))
    assert len(manifest) > 100
    response = client.put(
        "/v2/q-full/app/manifests/v1", content=manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    assert_quota_denied(response, "q-full")
    assert client.get("/v2/q-full/app/manifests/v1").status_code == 404
    assert quota_registry.used("q-full") == 1 * MiB - 100


def test_a_refusal_mid_body_reaches_a_client_still_sending(client: httpx.Client) -> None:
    """The quota stops fitting after a few MiB of a 64 MiB chunked PATCH: the server reads and
    drops the rest before answering, so the client, done writing, reads the 403 (answering at
    once and closing gave skopeo a broken pipe instead of the message)."""
    location = start_upload(client, "q-full/stream").headers["location"]
    block = os.urandom(MiB)
    response = client.patch(location, content=(block for _ in range(64)))
    assert_quota_denied(response, "q-full")


def test_a_layer_shared_inside_the_namespace_counts_once(
    quota_registry: QuotaRegistry, client: httpx.Client
) -> None:
    shared = os.urandom(1 * MiB)
    one = push_image(client, "q-dedup/one", "v1", [shared, os.urandom(10 * KiB)])
    two = push_image(client, "q-dedup/two", "v1", [shared, os.urandom(20 * KiB)])
    again = push_image(client, "q-dedup/two", "v2", [shared])
    blobs = {**one.blobs, **two.blobs, **again.blobs}
    manifests = {image.digest: len(image.manifest) for image in (one, two, again)}
    expected = sum(blobs.values()) + sum(manifests.values())
    assert sum(blobs.values()) < 1 * MiB + 40 * KiB  # the shared layer is in there once
    assert (
        quota_registry.used("q-dedup") == expected == counted_from_rows(quota_registry.data_dir, "q-dedup/**")
    )

    # Deleting one image's manifest and layer link keeps the shared layer counted (two still has it).
    assert client.delete(f"/v2/q-dedup/one/manifests/{one.digest}").status_code == 202
    for digest in one.blobs:
        assert client.delete(f"/v2/q-dedup/one/blobs/{digest}").status_code == 202
    only_one = {d: s for d, s in one.blobs.items() if d not in two.blobs and d not in again.blobs}
    assert quota_registry.used("q-dedup") == expected - sum(only_one.values()) - len(one.manifest)
    assert quota_registry.used("q-dedup") == counted_from_rows(quota_registry.data_dir, "q-dedup/**")


def test_a_mount_from_outside_counts_and_can_be_refused(
    quota_registry: QuotaRegistry, client: httpx.Client
) -> None:
    outside = os.urandom(300 * KiB)
    digest = push_blob(client, "elsewhere/src", outside)
    before = quota_registry.used("q-mount")
    response = client.post("/v2/q-mount/a/blobs/uploads/", params={"mount": digest, "from": "elsewhere/src"})
    assert response.status_code == 201, response.text
    assert quota_registry.used("q-mount") == before + len(outside)
    # Inside the namespace already: a second mount costs nothing.
    response = client.post("/v2/q-mount/b/blobs/uploads/", params={"mount": digest, "from": "q-mount/a"})
    assert response.status_code == 201, response.text
    assert quota_registry.used("q-mount") == before + len(outside)

    too_big = push_blob(client, "elsewhere/src", os.urandom(800 * KiB))
    response = client.post("/v2/q-mount/a/blobs/uploads/", params={"mount": too_big, "from": "elsewhere/src"})
    assert_quota_denied(response, "q-mount")
    assert client.head(f"/v2/q-mount/a/blobs/{too_big}").status_code == 404
    assert quota_registry.used("q-mount") == before + len(outside)


def test_concurrent_pushes_cannot_jointly_exceed(quota_registry: QuotaRegistry) -> None:
    blobs = [os.urandom(400 * KiB) for _ in range(5)]  # any two fit in 1 MiB, no three do
    barrier = threading.Barrier(len(blobs))
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def push(data: bytes) -> None:
        with httpx.Client(base_url=quota_registry.url, timeout=60) as client:
            location = start_upload(client, "q-race/app").headers["location"]
            barrier.wait()
            response = client.put(with_query(location, {"digest": sha256(data)}), content=data)
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=push, args=(data,)) for data in blobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(response.status_code for response in answers)
    assert statuses == [201, 201, 403, 403, 403], [r.text for r in answers]
    for response in answers:
        if response.status_code == 403:
            assert_quota_denied(response, "q-race")
    used = quota_registry.used("q-race")
    assert used == 2 * 400 * KiB == counted_from_rows(quota_registry.data_dir, "q-race/**")
    present = [
        d
        for d in map(sha256, blobs)
        if httpx.head(f"{quota_registry.url}/v2/q-race/app/blobs/{d}").status_code == 200
    ]
    assert len(present) == 2
    assert check_data_dir(quota_registry.data_dir) == []


def test_the_warning_event_comes_once_per_crossing(
    quota_registry: QuotaRegistry, client: httpx.Client
) -> None:
    push_blob(client, "q-warn/app", os.urandom(500 * KiB))  # 49%
    crossing = os.urandom(350 * KiB)
    push_blob(client, "q-warn/app", crossing)  # 83%: the warning
    push_blob(client, "q-warn/app", os.urandom(50 * KiB))  # 88%: already warned
    assert client.delete(f"/v2/q-warn/app/blobs/{sha256(crossing)}").status_code == 202  # 54%: re-armed
    push_blob(client, "q-warn/app", os.urandom(300 * KiB))  # 83%: the second warning
    last = push_image(client, "q-warn/app", "last", [])  # its push event comes after every warning

    def delivered() -> list[dict[str, object]]:
        documents = [delivery.document for delivery in quota_registry.hook.accepted]
        return documents if any(d["digest"] == last.digest for d in documents) else []

    documents = wait_for(delivered, "the webhook deliveries")
    warnings = [d for d in documents if d["action"] == "quota.warning"]
    assert len(warnings) == 2, warnings
    first, second = (w["detail"] for w in warnings)
    assert first["quota"] == "q-warn/**" and first["limit_bytes"] == 1 * MiB  # type: ignore[index]
    assert first["used_bytes"] == 850 * KiB  # type: ignore[index]
    assert second["used_bytes"] == 850 * KiB  # type: ignore[index]
    assert all(w["repository"] == "q-warn/app" for w in warnings)


@pytest.mark.parametrize("layers", [(700_000, 500_000), (700_000, 48 * MiB)], ids=["small", "48MiB"])
def test_skopeo_reports_the_quota(
    quota_registry: QuotaRegistry, tmp_path: Path, layers: tuple[int, int]
) -> None:
    """With a 48 MiB layer the refusal comes while skopeo still has most of it to write: the
    server reads and drops the rest first, so skopeo reads the 403 (not a broken pipe)."""
    workdir = tmp_path / "skopeo"
    workdir.mkdir()
    skopeo = Skopeo(workdir)
    layout = write_oci_layout(tmp_path / "layout", {"v1": build_image(layers)})
    destination = f"docker://{quota_registry.server.host}/q-skopeo/app:v1"
    result = skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1", destination, check=False)
    assert result.returncode != 0
    assert re.search(r"storage quota of q-skopeo/\*\* exceeded", result.stderr), result.stderr
    assert quota_registry.used("q-skopeo") <= 1 * MiB
    assert httpx.head(f"{quota_registry.url}/v2/q-skopeo/app/manifests/v1").status_code == 404


def test_du_shows_quota_use(quota_registry: QuotaRegistry, client: httpx.Client) -> None:
    push_blob(client, "q-dedup/du", os.urandom(10 * KiB))
    env = {"CARGOHOLD_CONFIG": str(quota_registry.config), "CARGOHOLD_DATA_DIR": str(quota_registry.data_dir)}
    result = CliRunner().invoke(main, ["du", "--json"], env=env)
    assert result.exit_code == 0, result.output
    quotas = {q["repositories"]: q for q in json.loads(result.output)["quotas"]}
    assert set(quotas) == {f"{name}/**" for name in NAMESPACES}
    assert quotas["q-dedup/**"]["used_bytes"] == quota_registry.used("q-dedup") > 0
    assert quotas["q-dedup/**"]["limit_bytes"] == 4 * MiB
    table = CliRunner().invoke(main, ["du"], env=env)
    assert table.exit_code == 0, table.output
    assert re.search(r"q-dedup/\*\*\s+[0-9.]+ [KM]iB\s+4\.0 MiB", table.output), table.output


class _CommitTogether(FilesystemBackend):
    """Holds every upload's commit until all of them got there: each one has passed the
    checks before its bytes are committed, and only the link's transaction can still refuse."""

    def __init__(self, root: Path, parties: int) -> None:
        super().__init__(root)
        self.barrier = threading.Barrier(parties)

    @contextmanager
    def open_staged(self, key: str, token: str) -> Iterator[Any]:
        with super().open_staged(key, token) as writer:
            yield _GatedWriter(writer, self.barrier)


@dataclass
class _GatedWriter:
    writer: Any
    barrier: threading.Barrier

    @property
    def size(self) -> int:
        return int(self.writer.size)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def flush(self) -> str:
        return str(self.writer.flush())

    def commit(self, metadata: Mapping[str, str]) -> None:
        self.barrier.wait(timeout=30)
        self.writer.commit(metadata)


def test_uploads_that_passed_every_earlier_check_together_still_cannot_exceed(tmp_path: Path) -> None:
    blobs = [os.urandom(400) for _ in range(5)]
    backend = _CommitTogether(tmp_path / "blobs", len(blobs))
    registry = Registry(MetadataStore(tmp_path / "metadata.db"), backend, quotas=[Quota("race/**", 1000)])
    outcomes: list[str] = []

    def push(data: bytes) -> None:
        upload = registry.start_upload("race/app")
        try:
            registry.finish_upload("race/app", upload.id, sha256(data), [data], length=len(data))
            outcomes.append("stored")
        except QuotaExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=push, args=(data,)) for data in blobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 3 + ["stored"] * 2
    assert registry.usage().quotas[0].used_bytes == 800
    assert len(list(backend.list())) == 2  # the refused copies were committed, then deleted
    assert check_data_dir(tmp_path) == []


def test_fsck_finds_and_recounts_drifted_quota_counters(tmp_path: Path) -> None:
    registry = Registry(
        MetadataStore(tmp_path / "metadata.db"),
        FilesystemBackend(tmp_path / "blobs"),
        quotas=[Quota("ns/**", 10_000)],
    )
    engine_push(registry, "ns/app", "v1", b'{"n":1}', [os.urandom(1000)])
    used = registry.usage().quotas[0].used_bytes
    assert registry.fsck().clean
    with registry.store.write() as conn:  # what a process without the upkeep would leave behind
        conn.execute("DELETE FROM quota_objects WHERE size = 1000")
    report = registry.fsck()
    assert [(f.kind, f.subject, f.repaired) for f in report.findings] == [("quota_count", "ns/**", False)]
    assert registry.fsck(repair=True).findings[0].repaired
    assert registry.fsck().clean
    assert registry.usage().quotas[0].used_bytes == used
